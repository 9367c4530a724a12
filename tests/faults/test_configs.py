"""A corpus of broken configs (tests/faults/configs/): each is refused before anything starts, with
exactly one error line that names the path of what is wrong.

Every file starts with two comment lines: ``# wrong:`` says what is broken, ``# expect:`` a
fragment the error line must contain (``{file}`` stands for the file's path). The whole corpus
goes through the loader in-process (a subprocess per file costs a second on a small machine); a
handful of them also go through the real ``edgepipe validate`` and ``edgepipe run``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

from edgepipe.config import ConfigError, load_config
from edgepipe.registry import Registry

CORPUS = Path(__file__).parent / "configs"
FILES = sorted(CORPUS.glob("*.yaml"))
# No variable the corpus references is set; the environment is passed explicitly.
ENV = {"HOME": os.environ.get("HOME", "/root")}


def expectation(path: Path) -> Tuple[str, str]:
    text = path.read_text()
    wrong = re.search(r"^# wrong: (.+)$", text, re.M)
    expect = re.search(r"^# expect: (.+)$", text, re.M)
    assert wrong and expect, f"{path.name}: needs '# wrong:' and '# expect:' comment lines"
    return wrong.group(1), expect.group(1).replace("{file}", str(path))


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover()


def test_the_corpus_is_large_and_varied():
    assert len(FILES) >= 30
    wrongs = [expectation(p)[0] for p in FILES]
    assert len(set(wrongs)) == len(wrongs), "two corpus files claim the same fault"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_broken_config_is_refused_with_one_line_naming_the_path(path: Path, registry: Registry):
    _, expect = expectation(path)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), registry, ENV)
    errors = info.value.errors
    assert len(errors) == 1, f"expected exactly one error, got {errors}"
    line = errors[0]
    assert "\n" not in line and len(line) < 400, line
    assert expect in line, f"{expect!r} not in {line!r}"
    assert not re.search(r"got (.+) \(got \1\)", line), f"the value is quoted twice: {line!r}"
    assert "should match pattern" not in line, f"a raw regular expression instead of words: {line!r}"


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepipe", *args],
        capture_output=True, text=True, env=dict(ENV, PATH=os.environ.get("PATH", ""), **env), timeout=60,
    )


CLI_SAMPLE = [
    "out_of_range_iou",
    "duplicate_stage",
    "bad_yaml_bracket",
    "public_bind_without_curve",
    "missing_weights",
]


@pytest.mark.parametrize("stem", CLI_SAMPLE)
def test_cli_validate_prints_exactly_that_line_and_exits_nonzero(stem: str):
    path = CORPUS / f"{stem}.yaml"
    _, expect = expectation(path)
    r = _cli("validate", str(path))
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgepipe: error: "), r.stderr
    assert expect in lines[0], r.stderr


def test_run_refuses_a_broken_config_before_starting_anything(tmp_path: Path):
    """``run`` validates like ``validate``: no runtime directory, no worker, no sink file."""
    out = tmp_path / "out.jsonl"
    path = tmp_path / "c.yaml"
    path.write_text((CORPUS / "out_of_range_iou.yaml").read_text().replace("/tmp/edgepipe-fault.jsonl", str(out)))
    rundirs = tmp_path / "run"
    rundirs.mkdir()
    r = _cli("run", str(path), TMPDIR=str(rundirs))
    assert r.returncode != 0
    assert r.stderr.splitlines() == [
        "edgepipe: error: stages.post.iou_thres: Input should be less than or equal to 1 (got 1.5)"
    ]
    assert not out.exists() and list(rundirs.iterdir()) == []


def test_the_checks_leave_valid_yaml_features_alone(tmp_path: Path, registry: Registry):
    """An alias repeats a mapping without repeating a key; ``$${`` is a literal ``${``; ports up
    to 65535 are fine."""
    path = tmp_path / "ok.yaml"
    path.write_text(
        "name: fault\n"
        "stages:\n"
        "  scene: {type: synthetic, width: 64, height: 64, fps: 5}\n"
        "  prep: &lb {type: letterbox, imgsz: 64, inputs: [scene]}\n"
        "  prep2: *lb\n"
        "  detector: {type: yolov5, inputs: [prep, prep2], cfg: yolov5n, imgsz: 64}\n"
        "  post: {type: nms, inputs: [detector]}\n"
        f"  out: {{type: jsonl, inputs: [post], path: '{tmp_path}/$${{x}}.jsonl'}}\n"
        "metrics: {listen: '127.0.0.1:65535'}\n"
    )
    p = load_config(str(path), registry, ENV)
    assert p.stages["prep2"].imgsz == 64
    assert p.stages["out"].path == f"{tmp_path}/${{x}}.jsonl"
