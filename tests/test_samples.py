"""Every shipped config and every first-party plugin's sample.yaml validates on this machine (no
camera, no GPU, no environment variables set), and `edgepipe run configs/camera.yaml` without a
camera stops at once with a message pointing at configs/synthetic.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.samples import SAMPLES, sample_pipeline

from edgepipe.registry import Registry

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/*.yaml"))
SHIPPED = ["camera", "synthetic", "rtsp", "jetson-csi", "multi-camera"]

@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover()


def test_every_first_party_stage_has_a_sample_and_readme(registry: Registry):
    first_party = {p.name: p.target for p in registry.plugins.values() if p.target.startswith("edgepipe_plugins.")}
    assert {"camera", "rtsp", "file", "images", "gstreamer", "synthetic", "zmq", "letterbox", "yolov5", "nms", "zmq_pub", "jsonl", "zmq_push"} <= set(first_party)
    for name, target in first_party.items():
        folder = REPO / "plugins" / Path(*target.split(":")[0].split(".")[1:])
        assert (folder / "sample.yaml").is_file(), f"{name}: no {folder}/sample.yaml"
        assert (folder / "README.md").is_file(), f"{name}: no {folder}/README.md"
        text = (folder / "sample.yaml").read_text()
        assert f"type: {name}" in text, f"{name}: its sample.yaml does not show the stage"


def test_the_shipped_configs_exist():
    assert sorted(p.stem for p in CONFIGS if p.stem in SHIPPED) == sorted(SHIPPED)


@pytest.mark.parametrize("path", CONFIGS + SAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_validates_with_no_environment(path: Path, registry: Registry):
    pipeline = sample_pipeline(path, registry)  # a snippet is completed with the standard chain
    assert pipeline.stages


def test_edgepipe_validate_accepts_the_shipped_configs():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPIPE_", "RTSP_", "CAMERA_", "CSI_"))}
    script = "\n".join(
        f"from edgepipe.cli import app; import sys\n"
        f"try: app([\"validate\", {str(p)!r}])\n"
        f"except SystemExit as e: assert e.code in (0, None), ({str(p)!r}, e.code)"
        for p in CONFIGS
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for p in CONFIGS:
        assert f"{p}: OK" in done.stdout, done.stdout


def test_camera_config_fails_fast_without_a_camera():
    assert not Path("/dev/video0").exists(), "this test expects a machine without a camera"
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "edgepipe", "run", str(REPO / "configs/camera.yaml")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    elapsed = time.monotonic() - t0
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "/dev/video0" in lines[0] and "configs/synthetic.yaml" in lines[0]
    # One line and no worker's log above: it failed in the pre-flight. The bound catches a hang.
    assert elapsed < 45, f"took {elapsed:.1f} s: the pre-flight must fail before starting workers"


def test_plugin_readmes_document_every_option_and_series():
    """Each first-party README's option and metrics tables are generated from the stage's Config
    and what it declares (tools/plugin_readmes.py), so they cannot drift: a field added without
    regenerating fails here."""
    from tools.plugin_readmes import first_party, rendered

    stale = [name for name, readme, model, series in first_party() if rendered(readme, model, series) != readme.read_text()]
    assert not stale, f"README out of date for {stale}: run `python -m tools.plugin_readmes`"
    for name, readme, model, _ in first_party():
        text = readme.read_text()
        for field in model.model_fields:
            if field != "type" and field not in ("inputs", "worker", "policy", "stall_timeout"):
                assert f"| `{field}` |" in text, f"{name}: option {field!r} missing from {readme}"
