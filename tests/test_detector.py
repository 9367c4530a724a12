"""The yolo library's Detector (one object for the stage, detect, evaluation and benchmarks) and
the CUDA graph cache behind the torch backend.

The cache's logic (keys, bound and eviction, padding or eager for partial batches, fallback when
a capture fails, the start-up parity check) runs here on the CPU through a stand-in for the CUDA
capture seam that records the function and re-runs it on replay, writing into the same output
tensor as a replayed graph does. The real CUDA graphs are in the `cuda`-marked tests."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from edgepipe.scenes import CLASSES, render_scene
from edgepipe.yolo import (
    Detector,
    DetectorError,
    letterbox,
    load_model,
    non_max_suppression,
    scale_boxes,
)
from edgepipe.yolo.backends import TorchBackend
from edgepipe.yolo.graphs import GraphCache
from edgepipe.yolo.model import build_model


class FakeGraphs:
    """Stands for torch.cuda.CUDAGraph + stream capture: 'capture' runs fn once (as the real one
    records it) and 'replay' re-runs it into the same output tensor, reading the static input at
    replay time. ``fail_on`` makes the capture of those batch sizes raise, ``corrupt`` makes
    replays wrong."""

    def __init__(self, fail_on=(), corrupt: bool = False) -> None:
        self.fail_on = set(fail_on)
        self.corrupt = corrupt
        self.captured = []

    def capture(self, fn):
        out = fn()
        if out.shape[0] in self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured.append(out.shape[0])

        def replay() -> None:
            out.copy_(fn() * (1.5 if self.corrupt else 1.0))

        return replay, out


def doubling(x: torch.Tensor) -> torch.Tensor:
    """A 'model' whose output row per image shows which input it saw: (B, 1, 2)."""
    return torch.stack([x.float().mean((1, 2)), x.float().amax((1, 2))], dim=1)[:, None, :] * 2


def cache(runtime, **kw) -> GraphCache:
    return GraphCache(doubling, lambda key: torch.zeros(key, dtype=torch.uint8), runtime, "cpu", **kw)


def batch(b: int, h: int = 4, w: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, h, w), dtype=np.uint8))


def test_graph_per_shape_captured_once_then_replayed():
    rt = FakeGraphs()
    g = cache(rt)
    for seed in range(3):
        x = batch(2, seed=seed)
        torch.testing.assert_close(g(x), doubling(x))
    y = batch(2, 8, 6)
    torch.testing.assert_close(g(y), doubling(y))
    assert rt.captured == [2, 2] and set(g.graphs) == {(2, 4, 6), (2, 8, 6)}
    assert g.stats()["replays"] == 4 and g.stats()["eager"] == 0


def test_partial_batches_pad_to_the_next_power_of_two_or_run_eagerly():
    rt = FakeGraphs()
    padded = cache(rt, pad="pad")
    padded(batch(8))
    x = batch(3, seed=5)
    torch.testing.assert_close(padded(x), doubling(x))  # the padded row is computed and ignored
    y = batch(7, seed=6)
    torch.testing.assert_close(padded(y), doubling(y))
    assert rt.captured == [8, 4] and padded.stats()["padded"] == 2
    eager = cache(FakeGraphs(), pad="eager")
    eager(batch(8))
    torch.testing.assert_close(eager(x), doubling(x))
    eager(batch(2))
    assert set(eager.graphs) == {(8, 4, 6), (2, 4, 6)} and eager.stats()["eager"] == 1
    with pytest.raises(ValueError, match="graph padding 'sometimes'"):
        cache(rt, pad="sometimes")


def test_cache_is_bounded_and_drops_the_least_recently_used(caplog):
    g = cache(FakeGraphs(), max_graphs=2)
    g(batch(1))
    g(batch(2))
    g(batch(1))  # 1 is now the most recent
    with caplog.at_level(logging.INFO):
        g(batch(4))
    assert list(g.graphs) == [(1, 4, 6), (4, 4, 6)] and g.stats()["evictions"] == 1
    assert "CUDA graph cache full (2): dropped batch 2 at 6x4" in caplog.text
    x = batch(3, seed=9)
    torch.testing.assert_close(g(x), doubling(x))  # padded into the graph of 4
    assert g.stats()["padded"] == 1


def test_a_failed_capture_runs_that_shape_eagerly_with_one_log_line(caplog):
    g = cache(FakeGraphs(fail_on={2}))
    with caplog.at_level(logging.WARNING):
        for seed in range(3):
            x = batch(2, seed=seed)
            torch.testing.assert_close(g(x), doubling(x))
    lines = [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(lines) == 1 and "batch 2 at 6x4, running it eagerly" in lines[0].getMessage()
    assert g.stats()["eager"] == 3 and g.stats()["failed"] == 1
    g(batch(1))
    assert (1, 4, 6) in g.graphs  # other shapes still get graphs


def test_startup_parity_check_turns_graphs_off_when_they_differ(caplog):
    good = cache(FakeGraphs())
    assert good.check(batch(4)) and good.enabled
    bad = cache(FakeGraphs(corrupt=True))
    with caplog.at_level(logging.WARNING):
        assert not bad.check(batch(4))
    assert not bad.enabled and not bad.graphs
    assert "CUDA graph output differs from the eager forward" in caplog.text and "running eagerly" in caplog.text
    x = batch(4, seed=3)
    torch.testing.assert_close(bad(x), doubling(x))  # eager from now on


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(3)
    return build_model("yolov5n", ch=1).fuse().eval()


def test_torch_backend_with_graphs_gives_the_eager_candidates(small_model):
    """The whole torch backend path with graphs on (pinned staging, static input, padding,
    candidate filter), with only the capture faked: same rows as without graphs."""
    plain = TorchBackend(small_model)
    graphed = TorchBackend(small_model, graphs=True, graph_runtime=FakeGraphs(), max_graphs=3)
    graphed.max_forward_batch = None  # whole batches, as on CUDA
    graphed._host = lambda b: torch.from_numpy(np.ascontiguousarray(b))  # pinning needs a CUDA driver
    assert graphed.check_graphs(np.full((4, 64, 64), 114, np.uint8))
    for b in (4, 3, 1, 4):
        x = np.random.default_rng(b).integers(0, 256, (b, 64, 64), dtype=np.uint8)
        rows, counts = graphed.candidates(x, 0.001)
        ref_rows, ref_counts = plain.candidates(x, 0.001)
        assert counts.tolist() == ref_counts.tolist()
        np.testing.assert_allclose(rows, ref_rows, rtol=1e-5, atol=1e-4)
    assert graphed.graphs.stats()["padded"] == 1  # the batch of 3 rode in the graph of 4
    assert set(graphed.graphs.graphs) == {(4, 64, 64), (1, 64, 64)}


def test_detector_image_api_matches_the_reference_flow(tmp_path):
    """detector(image) = letterbox -> model -> NMS -> boxes in the image's pixels, the flow a
    user of the reference writes by hand with the public functions."""
    det = Detector.load("builtin:demo", device="cpu", backend="torch", imgsz=320)
    assert det.names == list(CLASSES) and det.precision == "fp32" and det.device == "cpu"
    img, truth = render_scene(np.random.default_rng(5), 480, 300, n_objects=(3, 3), size_range=(40, 90))
    model = load_model("builtin:demo", device="cpu")
    lb, ratio, pad = letterbox(img, 320, stride=32)
    with torch.no_grad():
        ref = non_max_suppression(model(torch.from_numpy(lb)[None, None].float() / 255), 0.25, 0.45)[0].numpy()
    scale_boxes(lb.shape, ref, img.shape, ratio_pad=(ratio, pad))
    got = det(img)
    assert len(got) == len(ref) >= 3
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    many, timing = det.detect([img, img[:200], img])
    assert [len(d) for d in many][0] == len(ref) and set(timing) == {"letterbox", "inference", "nms"}
    np.testing.assert_allclose(many[2], ref, rtol=1e-4, atol=1e-3)
    rows, counts = det.candidates(np.stack([lb, lb]))
    assert counts.tolist() == [counts[0]] * 2 and rows.shape[1] == 5 + len(CLASSES)


def test_detector_from_a_built_model_and_its_errors(small_model):
    det = Detector.from_model(small_model, "torch", 64, conf_thres=0.0, max_det=5)
    assert det.nc == 80 and det.stride == 32 and det.imgsz == (64, 64)
    assert det(np.zeros((48, 64), np.uint8)).shape == (5, 6)
    with pytest.raises(DetectorError, match="not a multiple of the model's stride 32"):
        Detector.from_model(small_model, "torch", 100)
    with pytest.raises(DetectorError, match="no model"):
        Detector.load(device="cpu")
    with pytest.raises(DetectorError, match="unknown device 'gpu'"):
        Detector.load(cfg="yolov5n", device="gpu")
    with pytest.raises(DetectorError, match="half: true needs a CUDA device"):
        Detector.load(cfg="yolov5n", device="cpu", half=True)
    with pytest.raises(DetectorError, match="precision int8 needs a quantized model"):
        Detector.load(cfg="yolov5n", device="cpu", precision="int8", imgsz=64)


def test_auto_keeps_fp32_for_a_model_the_gate_cannot_check_and_races_bf16_for_the_demo():
    untrained = Detector.load(cfg="yolov5n", device="cpu", imgsz=64)
    assert untrained.precision == "fp32" and untrained.backend.name == "onnxruntime"
    assert "bf16 gate could not check" in untrained.choice.describe()
    demo = Detector.load("builtin:demo", device="cpu", imgsz=256)
    text = demo.choice.describe()
    assert "bf16 gate passed: bf16 mAP@0.5" in text and "raced onnxruntime fp32" in text
    assert demo.precision in ("fp32", "bf16")  # whichever measured faster on this machine


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_and_pad_partial_batches():
    det = Detector.load(cfg="yolov5n", device="cuda", imgsz=128, max_batch=8, conf_thres=0.001)
    eager = Detector.load(cfg="yolov5n", device="cuda", imgsz=128, max_batch=8, conf_thres=0.001, cuda_graphs=False)
    graphs = det.backend.graphs
    assert graphs is not None and graphs.enabled and (8, 128, 128) in graphs.graphs and (1, 128, 128) in graphs.graphs
    for b in (8, 3, 1):
        x = np.random.default_rng(b).integers(0, 256, (b, 128, 128), dtype=np.uint8)
        rows, counts = det.candidates(x)
        ref_rows, ref_counts = eager.candidates(x)
        assert abs(int(counts.sum()) - int(ref_counts.sum())) <= max(2, int(ref_counts.sum()) // 50)
    assert graphs.stats()["padded"] >= 1 and graphs.stats()["failed"] == 0
    assert "CUDA graphs on (match eager)" in det.choice.describe()


def test_the_yolo_library_knows_nothing_of_the_daemon_and_plugins_import_no_sibling():
    """One Detector for every caller only helps if it stays a library: no stage, worker,
    supervisor, config or metrics import under edgepipe/yolo, and no plugin importing another."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    daemon = ("edgepipe.stage", "edgepipe.worker", "edgepipe.supervisor", "edgepipe.metrics", "edgepipe.config",
              "edgepipe_plugins")
    for path in (root / "edgepipe" / "yolo").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith(daemon)], (path.name, names)
    for path in (root / "plugins").glob("*/*/__init__.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module in ("_common", None) or node.module.startswith("_"), (path, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                assert (path.parent / f"{node.module.split('.')[0]}.py").exists() or \
                    (path.parent / node.module.split(".")[0]).is_dir(), (path, node.module)
