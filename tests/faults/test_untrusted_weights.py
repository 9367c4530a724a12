"""Untrusted weights files: what tests/test_weights.py does not already cover.

test_weights.py proves that GLOBAL-opcode pickles naming os.system, eval, Popen... are refused
before they run, that three damaged safetensors variants are refused, and that a 3-channel model
is explained by ``load_model``. Here: the other opcodes that import (STACK_GLOBAL, INST, OBJ);
pickles and archives that are harmless to run but would make the loader allocate gigabytes from a
few bytes (a memo index, a zip bomb, a zero-stride tensor); safetensors damaged at every kind of
place, including a hostile architecture in the metadata; and both refusals as a user meets them,
through ``edgepipe run``: the daemon stops with one line, and nothing the file named has run.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from helpers.daemon import Daemon
from helpers.yolo import randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_weights import write_pickle_archive, write_reference_checkpoint

from edgepipe.yolo.model import build_model
from edgepipe.yolo.weights import WeightsError, load_model, read_weights, save_model


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A valid edgepipe safetensors file of a small model."""
    path = tmp_path_factory.mktemp("w") / "n.safetensors"
    save_model(randomize(build_model("yolov5n", nc=2), seed=1).eval().half(), path)
    return path


def refused(path: Path) -> str:
    """The one-line WeightsError reading ``path`` gives (anything else fails the test)."""
    with pytest.raises(WeightsError) as err:
        read_weights(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    return text


# -- pickles that import by other opcodes ---------------------------------------------------------


def hostile_pickles(marker: Path) -> Dict[str, bytes]:
    """The two opcodes besides GLOBAL that import a module.name (test_weights.py has GLOBAL)."""
    cmd = f"touch {marker}".encode()
    return {
        # protocol 4: module and name pushed as strings, then STACK_GLOBAL, then REDUCE
        "STACK_GLOBAL": b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.",
        # INST: import module.name and call it with the marked arguments, in one opcode
        "INST": b"(S'" + cmd + b"'\nios\nsystem\n.",
    }


@pytest.mark.parametrize("opcode", ["STACK_GLOBAL", "INST"])
def test_pickles_importing_by_any_opcode_are_refused_before_running(tmp_path: Path, opcode: str):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    write_pickle_archive(path, hostile_pickles(marker)[opcode])
    modules = set(sys.modules)
    text = refused(path)
    assert text.startswith(f"refusing to load {path}: pickle references os.system, which is not allowed")
    assert not marker.exists()
    # Nothing imported either (zipfile may load a codec for the member names).
    assert not {m for m in set(sys.modules) - modules if not m.startswith("encodings.")}


# -- small files that would allocate gigabytes ---------------------------------------------------


def _memo_bomb(path: Path) -> None:
    # BINPUT-style store at index 2**26: C pickle sizes its memo table to twice that (1 GiB).
    write_pickle_archive(path, b"\x80\x02N" + b"r" + struct.pack("<I", 2**26) + b".")


def _zip_bomb(path: Path) -> None:
    # 256 MiB of zeros after the pickle's STOP, deflated to a quarter of a megabyte.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as f:
            f.write(b"N.")
            chunk = bytes(1 << 20)
            for _ in range(256):
                f.write(chunk)
        zf.writestr("archive/version", "3\n")


def _expanded_tensor(path: Path) -> None:
    # A real torch.save of an expanded (zero-stride) tensor, its size rewritten to 2**28 elements
    # over a storage of one: cloning it would take a gigabyte.
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(1).expand(1000)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                old = b"M\xe8\x03\x85"  # BININT2 1000, TUPLE1: the size (1000,)
                assert data.count(old) == 1
                data = data.replace(old, b"J" + struct.pack("<i", 2**28) + b"\x85")
            dst.writestr(name, data)


BOMBS = {
    "memo index": (_memo_bomb, "pickle memo index 67108864 is out of sequence"),
    "zip bomb": (_zip_bomb, "record 'archive/data.pkl' would expand from"),
    "zero-stride tensor": (_expanded_tensor, "(268435456 elements) expands a storage of 1"),
}


# Reads each file in a fresh process and reports its error and the peak memory growth while
# reading it (Linux: writing 5 to clear_refs resets the peak, VmHWM, to the current size).
_MEASURE = """
import json, sys
from edgepipe.yolo.weights import WeightsError, read_weights
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
out = {}
for what, path in json.loads(sys.argv[1]).items():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    try:
        read_weights(path)
        error = "loaded"
    except WeightsError as exc:
        error = str(exc)
    out[what] = {"error": error, "growth": status("VmHWM") - before}
print(json.dumps(out))
"""


def test_archives_that_would_exhaust_memory_are_refused_cheaply(tmp_path: Path):
    """Each is refused with one line before it costs memory: reading one raises the process's
    peak by less than 32 MiB (read as they say, they take 256 MiB to 1 GiB)."""
    paths = {}
    for what, (make, _) in BOMBS.items():
        paths[what] = str(tmp_path / f"{what.replace(' ', '_')}.pt")
        make(Path(paths[what]))
        assert Path(paths[what]).stat().st_size < 1 << 20
    r = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(paths)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for what, (_, expected) in BOMBS.items():
        assert expected in result[what]["error"], (what, result[what]["error"])
        assert result[what]["growth"] < 32 << 20, f"{what}: peak memory grew by {result[what]['growth'] >> 20} MiB"


# -- damaged safetensors ---------------------------------------------------------------------------


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    n = int.from_bytes(data[:8], "little")
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def test_safetensors_damaged_in_each_part_are_refused(small: Path, tmp_path: Path):
    data = small.read_bytes()
    header = _header(data)
    first = next(k for k in header if k != "__metadata__")
    variants: Dict[str, bytes] = {
        "header length beyond the file": (2**62).to_bytes(8, "little") + data[8:],
        "unknown dtype": _with_header(data, dict(header, **{first: dict(header[first], dtype="F99")})),
        "offsets beyond the data": _with_header(
            data, dict(header, **{first: dict(header[first], data_offsets=[0, 10**12])})),
        "shape disagreeing with the offsets": _with_header(
            data, dict(header, **{first: dict(header[first], shape=[7, 7, 7, 7])})),
        "data cut short": data[: len(data) - 100],
        "header only": data[: 8 + int.from_bytes(data[:8], "little")],
        "eight bytes": data[:8],
    }
    seen = []
    for what, content in variants.items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        path.write_bytes(content)
        seen.append((what, refused(path)))
    assert all("damaged safetensors" in text or "not a known weights format" in text
               or "is an empty file" in text for _, text in seen), seen


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_safetensors_truncated_anywhere_are_refused(small: Path, tmp_path: Path, data):
    raw = small.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    with pytest.raises(WeightsError) as err:
        load_model(path, device="cpu")
    assert "\n" not in str(err.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_safetensors_with_a_flipped_header_byte_load_or_are_refused_cleanly(small: Path, tmp_path: Path, data):
    """A flip inside a string of the JSON header (a tensor name, a metadata value) may leave a
    readable file; the loader then either loads it or refuses it with one line, never worse."""
    raw = small.read_bytes()
    n = 8 + int.from_bytes(raw[:8], "little")
    i = data.draw(st.integers(8, n - 1))
    path = tmp_path / "flip.safetensors"
    path.write_bytes(raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :])
    try:
        load_model(path, device="cpu")
    except WeightsError as exc:
        assert "\n" not in str(exc)


def test_hostile_architecture_metadata_runs_nothing(small: Path, tmp_path: Path):
    """The architecture in the metadata is data: a layer named by a Python expression is refused
    by name lookup, never evaluated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    marker = tmp_path / "ran"
    with safe_open(str(small), "pt") as f:  # type: ignore[no-untyped-call]
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expressions = {
        "backbone": f"__import__('os').system('touch {marker}')",
        "anchors": f"__import__('os').system('touch {marker}')",
        "head": f"eval(\"open('{marker}', 'w')\")",
    }
    for where, expr in expressions.items():
        arch = json.loads(meta["arch"])
        if where == "anchors":
            arch["anchors"] = expr
        else:
            rows = [list(r) for r in arch[where]]
            rows[1][2] = expr
            arch[where] = rows
        path = tmp_path / f"{where}.safetensors"
        save_file(tensors, str(path), metadata=dict(meta, arch=json.dumps(arch)))
        with pytest.raises(WeightsError) as err:
            load_model(path, device="cpu")
        assert "\n" not in str(err.value)
        assert not marker.exists(), where


# -- through the daemon ----------------------------------------------------------------------------


def _detector_daemon(tmp_path: Path, weights: Path) -> List[str]:
    """``edgepipe run`` with ``weights`` in a one-worker pipeline; its log lines (it must fail)."""
    config = {
        "name": "weights",
        "stages": {
            "scene": {"type": "synthetic", "width": 64, "height": 64, "fps": 5, "worker": "all"},
            "prep": {"type": "letterbox", "inputs": ["scene"], "imgsz": 64, "worker": "all"},
            "det": {"type": "yolov5", "inputs": ["prep"], "weights": str(weights), "device": "cpu",
                    "imgsz": 64, "worker": "all"},
            "post": {"type": "nms", "inputs": ["det"], "worker": "all"},
            "out": {"type": "jsonl", "inputs": ["post"], "path": str(tmp_path / "out.jsonl"), "worker": "all"},
        },
    }
    with Daemon(config, tmp_path) as d:
        assert d.wait(120) == 1, d.log
        d.assert_no_leftovers()
        return d.lines


def test_run_refuses_a_hostile_checkpoint_with_one_line_and_runs_nothing(tmp_path: Path):
    marker = tmp_path / "ran"
    evil = tmp_path / "best.pt"
    write_pickle_archive(evil, hostile_pickles(marker)["STACK_GLOBAL"])
    lines = _detector_daemon(tmp_path, evil)
    failed = [line for line in lines if "failed to start" in line]
    assert len(failed) == 1, lines
    assert (
        f"Worker 'all' failed to start: cannot load weights '{evil}': refusing to load {evil}: "
        "pickle references os.system, which is not allowed"
    ) in failed[0]
    assert not marker.exists()
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_run_explains_a_three_channel_model(tmp_path: Path):
    colour = randomize(build_model("yolov5n", ch=3, nc=2), seed=2).eval()
    path = tmp_path / "rgb.pt"
    write_reference_checkpoint(path, colour)
    lines = _detector_daemon(tmp_path, path)
    failed = [line for line in lines if "failed to start" in line]
    assert len(failed) == 1, lines
    assert "has 3 input channels; edgepipe runs 1-channel models: convert it with `edgepipe weights convert --gray" in failed[0]
