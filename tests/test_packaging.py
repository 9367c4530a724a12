"""The package as a user installs it: a wheel built from this tree carries the code, the plugins
(as ``edgepipe_plugins``), their entry points and every piece of package data, and works when
installed somewhere other than this checkout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Tuple[Path, str]:
    """The wheel built from this tree, and everything the build printed."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("edgepipe-*.whl")
    return whl, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(build) -> Path:
    return build[0]


def test_build_prints_no_packaging_warnings(build):
    # pip passes the build backend's warnings through even with -q: a user installing edgepipe
    # saw about 125 lines of them (a deprecated license table, data folders setuptools could
    # not place). A clean build prints nothing at all.
    _, output = build
    flagged = [line for line in output.splitlines() if re.search(r"warn|deprecat|!!", line, re.I)]
    assert not flagged, "the build printed warnings:\n" + output


def test_wheel_carries_code_plugins_entry_points_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "edgepipe/cli.py",
        "edgepipe/yolo/configs/yolov5s-r5.0.yaml",
        "edgepipe/schemas/detections.schema.json",
        "edgepipe/data/demo-yolov5n.safetensors",
        "edgepipe_plugins/sources/synthetic/__init__.py",
        "edgepipe_plugins/sources/synthetic/sample.yaml",
        "edgepipe_plugins/sinks/preview/page.html",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "[edgepipe.stages]" in text and "edgepipe_plugins.sources.synthetic:SyntheticSource" in text
    assert "edgepipe = edgepipe.cli:main" in text
    # every plugin folder ships its sample.yaml
    plugin_dirs = {n.rsplit("/", 1)[0] for n in names if n.startswith("edgepipe_plugins/") and n.endswith("/__init__.py") and n.count("/") == 3}
    assert len(plugin_dirs) >= 14, sorted(plugin_dirs)
    for d in plugin_dirs:
        assert f"{d}/sample.yaml" in names, f"{d} has no sample.yaml in the wheel"


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    code = (
        "import json, edgepipe, edgepipe_plugins, edgepipe.yolo.builtin as b\n"
        "print(json.dumps([edgepipe.__file__, edgepipe_plugins.__file__, str(b.builtin_path('demo'))]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for f in json.loads(out.stdout):
        assert f.startswith(str(target)), f"{f} was not imported from the installed wheel"
    plugins = subprocess.run([sys.executable, "-m", "edgepipe", "plugins", "--json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert plugins.returncode == 0, plugins.stderr
    types = {p["name"] for p in json.loads(plugins.stdout)}
    assert {"synthetic", "letterbox", "yolov5", "nms", "zmq_pub", "jsonl", "preview"} <= types
    val = subprocess.run([sys.executable, "-m", "edgepipe", "validate", str(REPO / "configs" / "demo.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert val.returncode == 0, val.stderr


# --- the Makefile's install steps ---------------------------------------------------------------


def _make(venv: Path, *targets: str, question: bool = False) -> subprocess.CompletedProcess:
    """make in this checkout with a stand-in venv: pip is `echo pip` (what would be installed
    lands in the install log), no torch step."""
    argv = ["make", "-C", str(REPO), "--no-print-directory", f"VENV={venv}", "TORCH=", "PIP=echo pip"]
    return subprocess.run(argv + (["-q"] if question else []) + list(targets),
                          capture_output=True, text=True, timeout=60)


def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    return venv


def _installed_extras(venv: Path) -> List[set]:
    """The extras of each `pip install -e .[...]` the Makefile ran, in order."""
    log = (venv / "install.log").read_text()
    return [set(m.split(",")) for m in re.findall(r"pip install -q -e \.\[([\w,]+)\]", log)]


def test_make_demo_installs_runtime_and_onnxruntime_only_and_says_so(tmp_path):
    venv = _fake_venv(tmp_path)
    done = _make(venv, f"{venv}/.stamp-demo")
    assert done.returncode == 0, done.stderr
    assert _installed_extras(venv) == [{"onnxruntime"}], "make demo must not install the test and lint tools"
    # One line says what happens; pip's own output stays in the log.
    assert "Installing edgepipe and its dependencies" in done.stdout
    assert "pip install" not in done.stdout, done.stdout
    assert _make(venv, f"{venv}/.stamp-demo", question=True).returncode == 0, "a second make demo reinstalls"
    # demo, then test: the test and lint tools come on top.
    assert _make(venv, f"{venv}/.stamp-install").returncode == 0
    assert _installed_extras(venv)[1] == {"onnxruntime", "test", "lint"}
    for stamp in (".stamp-demo", ".stamp-install"):
        assert _make(venv, f"{venv}/{stamp}", question=True).returncode == 0, f"{stamp} out of date"


def test_make_test_first_leaves_nothing_for_make_demo_to_install(tmp_path):
    venv = _fake_venv(tmp_path)
    assert _make(venv, f"{venv}/.stamp-install").returncode == 0
    assert _installed_extras(venv) == [{"onnxruntime", "test", "lint"}]
    assert _make(venv, f"{venv}/.stamp-demo", question=True).returncode == 0, "make demo would reinstall"
