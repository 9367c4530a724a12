"""Benchmark of the detector's pre/post-processing: NMS over 1k and 10k candidates, letterbox of a
1080p frame.

Candidates look like a detector's raw output: boxes jittered around a few dozen objects, each
object of one class with the odd stray class, scores spread over (0.25, 1); a "scattered" case
(every candidate its own object, so most boxes survive) shows the other end. OpenCV's
``cv2.dnn.NMSBoxesBatched`` is timed on the same boxes for comparison (it is not a drop-in: its
box format, rounding and tie order differ, so its count of kept boxes is shown beside ours), and
torchvision's ``batched_nms`` when it is installed.

    python -m benchmarks.bench_ops            # full run
    python -m benchmarks.bench_ops --smoke    # a few repeats, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import cv2
import numpy as np

from edgepipe.yolo.ops import letterbox, nms_candidates


def candidates(n: int, nc: int, seed: int = 0, objects: int = 50) -> np.ndarray:
    """(n, 5+nc) float32 detector rows above conf 0.25, clustered around ``objects`` objects."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(40, 600, (objects, 2))
    sizes = rng.uniform(12, 240, (objects, 2))
    obj_cls = rng.integers(0, nc, objects)
    k = rng.integers(0, objects, n)
    rows = np.zeros((n, 5 + nc), np.float32)
    rows[:, :2] = centers[k] + rng.normal(0, 0.08, (n, 2)) * sizes[k]
    rows[:, 2:4] = sizes[k] * rng.uniform(0.75, 1.25, (n, 2))
    rows[:, 4] = rng.uniform(0.3, 1.0, n)
    rows[:, 5:] = rng.uniform(0, 0.3, (n, nc))
    cls = np.where(rng.uniform(0, 1, n) < 0.9, obj_cls[k], rng.integers(0, nc, n))
    rows[np.arange(n), 5 + cls] = rng.uniform(0.6, 1.0, n)
    return rows


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _best_class(rows: np.ndarray, conf: float) -> Any:
    """x1y1x2y2 boxes, scores and classes of the rows that NMS sees (best class above conf)."""
    scores_all = rows[:, 5:] * rows[:, 4:5]
    cls = scores_all.argmax(1)
    scores = scores_all[np.arange(len(rows)), cls]
    ok = (scores > conf) & (rows[:, 4] > conf)
    xy, wh = rows[ok, :2], rows[ok, 2:4]
    return np.concatenate([xy - wh / 2, xy + wh / 2], 1), scores[ok], cls[ok]


def _opencv_nms(rows: np.ndarray, conf: float, iou: float) -> Callable[[], Any]:
    boxes, scores, cls = _best_class(rows, conf)
    boxes[:, 2:] -= boxes[:, :2]  # OpenCV takes x, y (top-left), w, h
    box_list, score_list, cls_list = boxes.tolist(), scores.tolist(), cls.tolist()
    return lambda: cv2.dnn.NMSBoxesBatched(box_list, score_list, cls_list, conf, iou)


def _torchvision_nms(rows: np.ndarray, conf: float, iou: float) -> Any:
    try:
        import torch
        from torchvision.ops import batched_nms
    except ImportError:
        return None
    boxes, scores, cls = (torch.from_numpy(a) for a in _best_class(rows, conf))
    return lambda: batched_nms(boxes, scores, cls, iou)


def run(smoke: bool = False) -> List[Dict[str, Any]]:
    repeats = 3 if smoke else 50
    results: List[Dict[str, Any]] = []
    conf, iou = 0.25, 0.45
    cases = [(1000, 80, 50), (1000, 1, 50), (10000, 80, 50), (10000, 1, 50), (10000, 80, 10000)]
    for n, nc, objects in cases:
        rows = candidates(n, nc, objects=objects)
        kept = len(nms_candidates(rows, conf, iou, max_det=10**9))
        row: Dict[str, Any] = {
            "bench": "nms",
            "candidates": n,
            "classes": nc,
            "layout": "scattered" if objects == n else f"{objects} objects",
            "kept": kept,
            "edgepipe_ms": round(median_ms(lambda r=rows: nms_candidates(r, conf, iou), repeats), 3),
        }
        ocv = _opencv_nms(rows, conf, iou)
        row["opencv_ms"] = round(median_ms(ocv, max(1, repeats // 5)), 3)
        row["opencv_kept"] = len(ocv())
        tv = _torchvision_nms(rows, conf, iou)
        if tv is not None:
            row["torchvision_ms"] = round(median_ms(tv, repeats), 3)
            row["torchvision_kept"] = len(tv())
        results.append(row)

    rng = np.random.default_rng(0)
    frame_bgr = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    frame_gray = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
    lb_cases = (
        ("1080p gray -> 640x640", lambda: letterbox(frame_gray, 640, auto=False)),
        ("1080p gray -> 640 auto", lambda: letterbox(frame_gray, 640)),
        ("1080p BGR -> gray 640x640", lambda: letterbox(frame_bgr, 640, auto=False, gray=True)),
    )
    for name, fn in lb_cases:
        results.append(
            {"bench": "letterbox", "case": name, "ms": round(median_ms(fn, repeats), 3)}
        )
    return results


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="few repeats: check that it runs")
    parser.add_argument("--json", action="store_true", help="one JSON object per result")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # a pipeline stage gets one core; and the numbers stay comparable
    for r in run(args.smoke):
        if args.json:
            print(json.dumps(r))
        elif r["bench"] == "nms":
            extra = "".join(
                f"  {k}: {r[k + '_ms']:.2f} ms ({r[k + '_kept']} kept)"
                for k in ("opencv", "torchvision")
                if k + "_ms" in r
            )
            print(
                f"nms {r['candidates']:>6} candidates {r['classes']:>2} classes {r['layout']:>10}: "
                f"{r['edgepipe_ms']:.2f} ms ({r['kept']} kept){extra}"
            )
        else:
            print(f"letterbox {r['case']}: {r['ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
