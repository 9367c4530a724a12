"""int8 post-training quantization behind the accuracy gate (``edgepipe quantize``).

The fused fp32 model is exported with a uint8 input (as the CPU backends run it) and quantized by
onnxruntime's static quantizer (QDQ format: weights int8 per channel, activations uint8 with
ranges calibrated on the user's own frames), which both onnxruntime and OpenVINO run with their
int8 kernels. Nothing here is hand-written quantization.

The frames of the calibration folder are split: every ``holdout``-th one is kept out of the
calibration and used by the gate (:func:`edgepipe.yolo.evaluation.gate`). For the demo model
(its classes are those of :mod:`edgepipe.scenes`) the gate measures mAP@0.5 on generated
held-out scenes, which have labels; for any other model it measures how far the int8 boxes agree
with fp32's on the held-out frames. The gate runs on every engine installed (onnxruntime,
OpenVINO), and the model is written only if all pass, with the gate's numbers in its metadata,
where the ``yolov5`` stage reads and logs them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["QuantizeError", "quantize"]


class QuantizeError(ValueError):
    """A quantization that cannot be done or is refused by the gate; one line."""


def _letterboxed(images: Sequence[np.ndarray], imgsz: Tuple[int, int]) -> List[np.ndarray]:
    from edgepipe.yolo.ops import letterbox

    return [letterbox(img, imgsz, auto=False)[0] for img in images]


def _detect_nodes(model_path: str) -> List[str]:
    """Names of the nodes of the Detect head (its 1x1 convolutions and the box decoding after
    them): they stay in float. One tensor there holds box pixels (up to the input size) beside
    scores in [0, 1]; eight bits over that range round every score to 0."""
    import onnx

    graph = onnx.load(model_path).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if not convs:
        return []
    # The Detect convolutions are the ones whose output feeds no other convolution (the heads).
    consumers: Dict[str, List[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    heads = []
    for conv in convs:
        seen, frontier, feeds_conv = set(), list(conv.output), False
        while frontier and not feeds_conv:
            name = frontier.pop()
            for n in consumers.get(name, []):
                if n.op_type == "Conv":
                    feeds_conv = True
                    break
                if n.name not in seen:
                    seen.add(n.name)
                    frontier.extend(n.output)
        if not feeds_conv:
            heads.append(conv.name)
    after = set()
    frontier = [o for n in graph.node if n.name in heads for o in n.output]
    while frontier:
        name = frontier.pop()
        for n in consumers.get(name, []):
            if n.name not in after:
                after.add(n.name)
                frontier.extend(n.output)
    return heads + sorted(after)


def _quantize_static(fp32: bytes, frames: Sequence[np.ndarray], workdir: str) -> bytes:
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError:
        raise QuantizeError("quantization needs onnxruntime (pip install 'edgepipe[onnxruntime]')") from None

    class Frames(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(frames)

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            frame = next(self._it, None)
            return None if frame is None else {"images": frame[None]}

    src, dst = os.path.join(workdir, "fp32.onnx"), os.path.join(workdir, "int8.onnx")
    Path(src).write_bytes(fp32)
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = os.path.join(workdir, "pre.onnx")
        quant_pre_process(src, pre, skip_symbolic_shape=True)  # folds the exporter's leftovers
        src = pre
    except Exception:  # an older onnxruntime without it, or a graph it cannot pre-process
        pass
    import logging

    quiet = logging.getLogger()  # the quantizer logs a warning per layer on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_static(src, dst, Frames(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=_detect_nodes(src))
    except Exception as exc:  # the quantizer raises what onnx and numpy raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QuantizeError(f"onnxruntime's quantizer failed: {first}") from None
    finally:
        quiet.setLevel(level)
    return Path(dst).read_bytes()


def quantize(weights: str, calib: str, output: str, imgsz: Tuple[int, int] = (640, 640),
             holdout: int = 5, scenes: int = 100, cfg: Optional[str] = None,
             threads: Optional[int] = None) -> Dict[str, Any]:
    """Quantize ``weights`` to int8 on the frames of folder ``calib`` and write ``output`` if the
    gate accepts it; returns what was done (frames, gate results, path). QuantizeError (one
    line) otherwise, and then nothing is written."""
    from edgepipe.scenes import CLASSES
    from edgepipe.yolo.backends import (
        BackendError,
        OnnxModel,
        OnnxRuntimeBackend,
        OpenVinoBackend,
        export_uint8_onnx,
        openvino_available,
    )
    from edgepipe.yolo.detector import Detector
    from edgepipe.yolo.evaluation import gate, gate_scenes, read_images
    from edgepipe.yolo.export import _add_metadata
    from edgepipe.yolo.weights import WeightsError, current_umask, load_model

    try:
        model = load_model(weights, device="cpu", fuse=True, half=False, cfg=cfg)
    except WeightsError as exc:
        raise QuantizeError(str(exc)) from None
    stride = int(max(float(s) for s in model.stride))
    if imgsz[0] % stride or imgsz[1] % stride:
        raise QuantizeError(f"--imgsz {imgsz[0]},{imgsz[1]} is not a multiple of the model's stride {stride}")
    try:
        images = read_images(calib)
    except ValueError as exc:
        raise QuantizeError(f"--calib: {exc}") from None
    held = images[holdout - 1 :: holdout] if holdout > 1 else []
    calibration = [img for i, img in enumerate(images) if holdout <= 1 or (i + 1) % holdout]
    if len(calibration) < 8:
        raise QuantizeError(f"--calib {calib!r} has {len(images)} images; at least {8 + len(held)} are needed "
                            f"({len(held)} of them held out for the accuracy gate)")
    names = [str(n) for n in model.names]
    demo = tuple(names) == tuple(CLASSES)
    if not demo and len(held) < 2:
        raise QuantizeError("the gate needs held-out frames: use --holdout 2 or more (every Nth frame held out)")
    fp32_bytes = export_uint8_onnx(model, imgsz)
    with tempfile.TemporaryDirectory(prefix="edgepipe-quantize-") as tmp:
        int8_bytes = _quantize_static(fp32_bytes, _letterboxed(calibration, imgsz), tmp)
    fp32, int8 = OnnxModel(fp32_bytes), OnnxModel(int8_bytes, precision="int8")
    if demo:
        gate_images, truths = gate_scenes(imgsz, n=scenes)
        nms = {"conf_thres": 0.001, "iou_thres": 0.6}
    else:
        gate_images, truths, nms = list(held), None, {}
    engines = ["onnxruntime"] + (["openvino"] if openvino_available() else [])
    results = {}
    try:
        ref = Detector(OnnxRuntimeBackend(fp32, imgsz, threads), names, stride, imgsz, auto=False, **nms)  # type: ignore[arg-type]
        for engine in engines:
            backend = (OnnxRuntimeBackend(int8, imgsz, threads) if engine == "onnxruntime"
                       else OpenVinoBackend(int8, "CPU", None, threads))
            test = Detector(backend, names, stride, imgsz, auto=False, **nms)  # type: ignore[arg-type]
            results[engine] = gate("int8", ref, test, gate_images, truths, len(names))
    except BackendError as exc:
        raise QuantizeError(str(exc)) from None
    worst = min(results.values(), key=lambda r: (r.passed, r.value - r.reference))
    summary = {"frames": len(images), "calibration": len(calibration), "held_out": len(held),
               "gate": {e: r.to_json() for e, r in results.items()}, "accepted": all(r.passed for r in results.values()),
               "path": output}
    if not summary["accepted"]:
        failed = [f"{e}: {r.describe()}" for e, r in results.items() if not r.passed]
        raise QuantizeError(f"int8 refused by the accuracy gate ({'; '.join(failed)}); nothing written")
    meta = {
        "producer": "edgepipe",
        "format": "edgepipe.yolov5",
        "names": json.dumps(names),
        "stride": json.dumps([int(s) for s in model.stride]),
        "imgsz": json.dumps(list(imgsz)),
        "nc": str(model.nc),
        "ch": "1",
        "arch": json.dumps(model.yaml, default=str),
        "precision": "int8",
        "source": os.path.basename(str(weights)),
        "calibration_frames": str(len(calibration)),
        "gate": json.dumps(worst.to_json()),
        "gate_engines": json.dumps(summary["gate"]),
    }
    out = Path(output)
    tmp_out = out.with_name(f".{out.name}.tmp")
    try:
        tmp_out.write_bytes(_add_metadata(int8_bytes, meta))
        os.chmod(tmp_out, 0o666 & ~current_umask())
        os.replace(tmp_out, out)
    except OSError as exc:
        raise QuantizeError(f"cannot write {output}: {exc.strerror or exc}") from None
    summary["results"] = results
    return summary
