"""benchmarks/gpu_check.py, the one-run GPU check, exercised on the CPU (--dry-run): every part
runs, results land as JSON and markdown after each part, and one failing part loses nothing
else. The GPU numbers themselves come from running it on a GPU machine (benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_part(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path), "--dry-run",
                           "--only", "graphs,stage,stream1280"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry_run"] and list(doc["parts"]) == ["graphs", "stage", "stream1280"]
    assert all(p["status"] == "ok" for p in doc["parts"].values())
    stream = doc["parts"]["stream1280"]["result"]["figures"]
    assert stream["stream1280_pipeline_fps"] > 0 and stream["stream1280_stage_video_own_fps"] > 0
    assert stream["stream1280_stage_detector_own_fps"] > 0
    assert doc["parts"]["stage"]["result"]["figures"]["b1_stage_img_per_s"] > 0
    page = (tmp_path / "gpu_check.md").read_text()
    assert "## stream1280: ok" in page and "| stream1280_stage_video_own_fps |" in page


def test_one_failing_part_loses_nothing_else(tmp_path, monkeypatch):
    from edgepipe_benchmarks import gpu_check

    real = gpu_check._parts

    def broken(dry):
        parts = real(dry)
        parts["graphs"] = lambda _tmp: 1 / 0
        return parts

    monkeypatch.setattr(gpu_check, "_parts", broken)
    code = gpu_check.main([str(tmp_path), "--dry-run", "--only", "graphs,stage"])
    assert code == 1
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["parts"]["graphs"]["status"] == "error" and "ZeroDivisionError" in doc["parts"]["graphs"]["error"]
    assert doc["parts"]["stage"]["status"] == "ok" and doc["parts"]["stage"]["result"]["figures"]


def test_unknown_part_and_budget(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path), "--dry-run", "--only", "nope"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "unknown part(s) nope" in bad.stderr
    spent = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path), "--dry-run", "--only",
                            "graphs", "--budget", "0"], capture_output=True, text=True, cwd=REPO, timeout=120)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert spent.returncode == 1 and doc["parts"]["graphs"]["status"] == "skipped"
