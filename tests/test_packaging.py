"""The package as a user installs it: a wheel built from this tree carries the code, the plugins
(as ``edgepipe_plugins``), their entry points and every piece of package data, and works when
installed somewhere other than this checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("edgepipe-*.whl")
    return whl


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
