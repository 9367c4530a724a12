"""The config loader fuzzed: whatever file `edgepipe validate` or `run` is given (and whatever a
SIGHUP makes the daemon re-read), ``load_config`` returns a Pipeline or raises ConfigError whose
every line is one line; any other exception would be a traceback on the user's terminal, or, on
reload, an exception in the supervisor's loop.

Three generators: YAML documents built from random structures with anchors, aliases (cycles
included) and odd scalars; a valid pipeline with one setting replaced by a random value at a
random place; and raw text (random characters, tabs, unbalanced brackets, directives, tags).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepipe.config import ConfigError, Pipeline, load_config
from edgepipe.registry import Registry

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
REGISTRY = Registry.discover()
ENV = {"HOME": os.environ.get("HOME", "/root"), "EDGEPIPE_FUZZ_SET": "64"}
BASE: Dict[str, Any] = {
    "name": "fuzz",
    "stages": {
        "scene": {"type": "synthetic", "width": 64, "height": 64, "fps": 5},
        "prep": {"type": "letterbox", "inputs": ["scene"], "imgsz": 64},
        "detector": {"type": "yolov5", "inputs": ["prep"], "cfg": "yolov5n", "imgsz": 64},
        "post": {"type": "nms", "inputs": ["detector"]},
        "pub": {"type": "zmq_pub", "inputs": ["post"], "bind": "tcp://127.0.0.1:0"},
    },
    "metrics": {"listen": "127.0.0.1:0"},
    "runtime": {"stop_timeout": 5},
}

ODD_SCALARS = [
    ".nan", ".inf", "-.inf", "0", "-32", "1e400", "0x1F", "0o17", "~", "null", "yes", "no", "on", "off",
    "''", '""', "'${EDGEPIPE_FUZZ_UNSET}'", "'${EDGEPIPE_FUZZ_SET}'", "'${'", "'$${x}'", "'${A:-}'",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]",
    "'\\u0000'", "\"\\x00\"", "'" + "x" * 300 + "'", "[]", "{}", "[320]", "[320, 320, 320]", "-", "?",
    "!!python/object:os.system x", "!!str 1", "!!int '7'", "!!float 'abc'", "&a 1", "*undefined",
]


def load(text: str) -> Any:
    """Write ``text`` to a file and load it under the contract."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as f:
        f.write(text)
        path = f.name
    try:
        return check(path)
    finally:
        os.unlink(path)


def check(path: str) -> Any:
    try:
        out = load_config(path, REGISTRY, ENV)
    except ConfigError as exc:
        assert exc.errors, "a ConfigError without a reason"
        for line in exc.errors:
            assert isinstance(line, str) and line and "\n" not in line and len(line) < 1000, repr(line)
        return exc
    assert isinstance(out, Pipeline)
    return out


# -- 1. documents of random structure, with anchors and aliases ------------------------------------

@st.composite
def documents(draw: Any) -> str:
    """YAML text: nested mappings and sequences of odd scalars, some nodes anchored and later
    referenced (also from inside themselves, which makes a cycle)."""
    anchors: List[str] = []

    def node(depth: int, indent: str) -> str:
        choice = draw(st.integers(0, 9 if depth < 4 else 3))
        if choice <= 3:
            if anchors and draw(st.booleans()):
                return "*" + draw(st.sampled_from(anchors))
            return draw(st.sampled_from(ODD_SCALARS))
        anchor = ""
        if draw(st.integers(0, 3)) == 0:
            name = f"a{len(anchors)}"
            anchors.append(name)  # visible inside the node too: a cycle when used there
            anchor = f"&{name} "
        keys = draw(st.lists(st.sampled_from(["stages", "type", "inputs", "imgsz", "name", "metrics", "runtime",
                                              "scene", "detector", "x", "bind", "<<"]), max_size=4))
        if choice <= 6:
            items = ", ".join(f"{k}: {node(depth + 1, indent)}" for k in keys)
            return anchor + "{" + items + "}"
        items = ", ".join(node(depth + 1, indent) for _ in keys)
        return anchor + "[" + items + "]"

    top = draw(st.lists(st.sampled_from(["name", "stages", "metrics", "runtime", "extra"]), min_size=1, max_size=4, unique=True))
    return "\n".join(f"{k}: {node(0, '')}" for k in top) + "\n"


@FUZZ
@given(documents())
def test_random_documents_load_or_fail_with_lines(text: str):
    load(text)


# -- 2. a valid pipeline with one setting replaced ---------------------------------------------------

def paths(tree: Any, prefix: tuple = ()) -> List[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += paths(v, prefix + (i,))
    return out


SETTINGS = [p for p in paths(BASE) if p]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(["${EDGEPIPE_FUZZ_UNSET}", "${EDGEPIPE_FUZZ_SET}", "$${", "tcp://0.0.0.0:1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.sampled_from(SETTINGS), VALUES)
def test_one_setting_replaced_loads_or_fails_with_lines(where: tuple, value: Any):
    import copy

    tree = copy.deepcopy(BASE)
    node = tree
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    load(yaml.safe_dump(tree, allow_unicode=True))


# -- 3. raw text ------------------------------------------------------------------------------------

@FUZZ
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
       | st.lists(st.sampled_from(["name: x\n", "stages:\n", "  a: {type: synthetic}\n", "\t", "[", "]", "{", "}",
                                   "%YAML 1.1\n", "--- \n", "...\n", "!!python/name:os.system\n", "&x ", "*x ",
                                   ": ", "- ", "'", '"', "#", "\x00", "\ufeff", "? ", "|\n", ">-\n"]), max_size=30)
       .map("".join))
def test_raw_text_loads_or_fails_with_lines(text: str):
    load(text)


def test_an_unreadable_and_a_binary_file_are_one_line(tmp_path: Path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01 garbage")
    assert isinstance(check(str(binary)), ConfigError)
    assert check(str(tmp_path / "missing.yaml")).errors == [f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"]
