"""The ``edgepipe detect`` command: run the detector over images, folders, globs or video files.

It is the whole pipeline in one process, for trying a model on files: each frame is read (colour
turned to gray), letterboxed to the model's input, run through the 1-channel YOLOv5, put through
NMS and mapped back to the frame's pixels. Each frame prints one detection message, the same
document the daemon publishes (``--json``: one JSON line per frame; otherwise a short table), and
``--save-dir`` writes the frames with their boxes drawn. The model comes from ``--weights`` (any
weights file, ``builtin:demo``, or an ``.onnx`` from ``edgepipe export``/``quantize``), or, for
trying the plumbing before a trained model exists, is built untrained from ``--cfg`` with a fixed
``--seed``. The work is the yolo library's :class:`~edgepipe.yolo.detector.Detector`, as in the
daemon. At the end a summary goes to stderr (stdout stays the results, so ``--json`` pipes
cleanly): milliseconds per image for pre-process (letterbox), inference and post-process (NMS,
boxes scaled back), and where the results are.
"""

from __future__ import annotations

import glob
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import typer

IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".ts")
VIDEO_SOURCE = "video"  # the message `source` of video frames (images use their file stem)


class DetectError(Exception):
    """Bad input for ``detect``; the text is the one-line reason."""


def expand_source(source: str) -> List[Path]:
    """The files named by ``source``: a file, a folder (its images and videos), or a glob."""
    path = Path(source)
    known = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in known)
        if not files:
            raise DetectError(
                f"no images or videos in folder {source!r} (looked for {', '.join(known)})"
            )
        return files
    if path.is_file():
        return [path]
    if any(c in source for c in "*?["):
        matches = sorted(glob.glob(source, recursive=True))
        files = [Path(p) for p in matches if Path(p).is_file() and Path(p).suffix.lower() in known]
        if not files:
            raise DetectError(f"no images or videos match {source!r}")
        return files
    raise DetectError(f"source {source!r} does not exist (expected an image, folder, glob or video)")


def _read_image(path: Path) -> Any:
    import cv2
    import numpy as np

    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DetectError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DetectError(f"cannot read image {str(path)!r}: not an image format OpenCV decodes")
    return img


def _video_frames(path: Path) -> Iterator[Any]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise DetectError(f"cannot open video {str(path)!r}")
        n = 0
        while True:
            ok, img = cap.read()
            if not ok:
                break
            n += 1
            yield img
        if n == 0:
            raise DetectError(f"video {str(path)!r} has no readable frames")
    finally:
        cap.release()


def iter_frames(files: Sequence[Path]) -> Iterator[Tuple[Path, bool, int, Any]]:
    """(file, is_video, index within the file, BGR image) for every frame of ``files``."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # errors are ours to report, one line
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    for f in files:
        if f.suffix.lower() in VIDEO_SUFFIXES:
            for i, img in enumerate(_video_frames(f)):
                yield f, True, i, img
        else:
            yield f, False, 0, _read_image(f)


def parse_classes(values: Optional[List[str]], nc: int) -> Optional[List[int]]:
    """``--classes 0 --classes 2`` or ``--classes 0,2`` -> [0, 2], each checked against ``nc``."""
    if not values:
        return None
    out = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or int(part) >= nc:
                raise DetectError(f"--classes {part!r} is not a class index of this model (0..{nc - 1})")
            out.append(int(part))
    return out


def _table(msg: dict, file: str) -> str:
    ms = sum(msg["timing"]["stages"].values()) * 1000
    dets = msg["detections"]
    lines = [
        f"{msg['source']} #{msg['frame_id']} {file} ({msg['width']}x{msg['height']}): "
        f"{len(dets)} detection{'' if len(dets) == 1 else 's'}, {ms:.1f} ms"
    ]
    for d in dets:
        x1, y1, x2, y2 = d["bbox"]
        lines.append(
            f"  {d['class_id']:>3} {d['label']:<16} {d['confidence']:.3f}  "
            f"[{x1:8.1f} {y1:8.1f} {x2:8.1f} {y2:8.1f}]"
        )
    return "\n".join(lines)


def _save(save_dir: Path, file: Path, is_video: bool, index: int, img: Any, det: Any,
          names: List[str]) -> None:
    import cv2

    from edgepipe.draw import draw_detections, to_bgr

    name = f"{file.stem}_{index:06d}.jpg" if is_video else file.name
    if not is_video and file.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"):
        name = file.stem + ".png"  # formats OpenCV writes everywhere
    out = save_dir / name
    ok, buf = cv2.imencode(out.suffix, draw_detections(to_bgr(img), det, names))
    if not ok:
        raise DetectError(f"cannot encode {str(out)!r}")
    try:
        buf.tofile(str(out))
    except OSError as exc:
        raise DetectError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None


def detect(
    source: str = typer.Argument(..., help="Image file, folder, glob pattern ('imgs/*.jpg') or video file."),
    weights: Optional[str] = typer.Option(
        None, "--weights", "-w", help="Model weights (edgepipe safetensors, a YOLOv5 .pt, or a state dict with --cfg)."
    ),
    cfg: Optional[str] = typer.Option(
        None, "--cfg", help="Model config (e.g. yolov5n): without --weights, an untrained model built from it."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of the untrained --cfg model."),
    imgsz: int = typer.Option(640, "--imgsz", min=32, help="Inference size (pixels, a multiple of the stride)."),
    conf: float = typer.Option(0.25, "--conf", min=0.0, max=1.0, help="Confidence threshold."),
    iou: float = typer.Option(0.45, "--iou", min=0.0, max=1.0, help="NMS IoU threshold."),
    max_det: int = typer.Option(300, "--max-det", min=1, help="At most this many detections per frame."),
    classes: Optional[List[str]] = typer.Option(
        None, "--classes", help="Keep only these class indices (repeat, or comma-separated)."
    ),
    agnostic: bool = typer.Option(False, "--agnostic-nms", help="NMS across classes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: Optional[str] = typer.Option(
        None, "--backend", help="auto, torch, onnxruntime or openvino (default: torch; auto for an .onnx file)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON detection message per line."),
    save_dir: Optional[Path] = typer.Option(None, "--save-dir", help="Write annotated frames here."),
) -> None:
    """Detect objects in images or videos and print one detection message per frame."""
    from edgepipe.cli import fail

    try:
        _detect(source, weights, cfg, seed, imgsz, conf, iou, max_det, classes, agnostic, device,
                as_json, save_dir, backend)
    except DetectError as exc:
        raise fail(str(exc)) from None


def _load(weights: Optional[str], cfg: Optional[str], seed: int, device: str, imgsz: int,
          backend: Optional[str], conf: float, iou: float, max_det: int, agnostic: bool) -> Any:
    from edgepipe.yolo.detector import Detector, DetectorError, is_onnx

    if weights is None and cfg is None:
        raise DetectError("no model: give --weights FILE (or --cfg NAME for an untrained model)")
    if backend is None:  # torch gives exactly the Python API's numbers; an ONNX file needs another
        backend = "auto" if weights is not None and is_onnx(weights) else "torch"
    try:
        return Detector.load(weights, cfg=cfg, seed=seed, device=device, backend=backend, imgsz=imgsz,
                             conf_thres=conf, iou_thres=iou, max_det=max_det, agnostic=agnostic, max_batch=1)
    except DetectorError as exc:
        text = str(exc)
        if "is not a multiple of the model's stride" in text:
            text = f"--imgsz {imgsz} is not a multiple of the model's stride {text.rsplit(' ', 1)[-1]}"
        raise DetectError(text) from None


def _summary(frames: int, boxes: int, totals: Dict[str, float], detector: Any, save_dir: Optional[Path],
             saved: int, as_json: bool) -> List[str]:
    """The closing lines users of other detectors expect: time per image, where the results are."""
    n = max(frames, 1)
    h, w = detector.imgsz
    lines = [
        f"Speed: {1000 * totals['letterbox'] / n:.1f} ms pre-process, {1000 * totals['inference'] / n:.1f} ms "
        f"inference, {1000 * totals['nms'] / n:.1f} ms post-process per image at shape (1, 1, {h}, {w}) "
        f"({detector.backend.describe()})",
    ]
    where = "JSON lines on stdout" if as_json else "printed above"
    if save_dir is not None:
        where = f"saved to {save_dir.resolve()} ({saved} file{'' if saved == 1 else 's'})"
    lines.append(f"Results: {frames} image{'' if frames == 1 else 's'}, {boxes} detection{'' if boxes == 1 else 's'}, {where}")
    return lines


def _detect(source: str, weights: Optional[str], cfg: Optional[str], seed: int, imgsz: int,
            conf: float, iou: float, max_det: int, classes: Optional[List[str]], agnostic: bool,
            device: str, as_json: bool, save_dir: Optional[Path], backend: Optional[str] = None) -> None:
    from edgepipe.messages import Frame, detection_message, dumps

    files = expand_source(source)
    frames = iter_frames(files)
    first = next(frames)  # an unreadable first file fails before the (slow) model load
    detector = _load(weights, cfg, seed, device, imgsz, backend, conf, iou, max_det, agnostic)
    detector.classes = parse_classes(classes, detector.nc)
    if save_dir is not None:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DetectError(f"cannot create --save-dir {str(save_dir)!r}: {exc.strerror or exc}") from None
    names = detector.names
    totals = {"letterbox": 0.0, "inference": 0.0, "nms": 0.0}
    count = boxes = saved = 0
    for frame_id, (file, is_video, index, img) in enumerate(itertools.chain([first], frames)):
        captured = time.time()
        (det,), timing = detector.detect([img])
        for k in totals:
            totals[k] += timing[k]
        count += 1
        boxes += len(det)
        frame = Frame(
            source=VIDEO_SOURCE if is_video else file.stem,
            frame_id=frame_id,
            timestamp=captured,
            width=int(img.shape[1]),
            height=int(img.shape[0]),
            detections=det,
            names=names,
            timing=timing,
            meta={"file": str(file)},
        )
        msg = detection_message(frame)
        typer.echo(dumps(msg).decode() if as_json else _table(msg, str(file)))
        if save_dir is not None:
            _save(save_dir, file, is_video, index, img, det, names)
            saved += 1
    sys.stdout.flush()  # the results first, then the summary on stderr
    for line in _summary(count, boxes, totals, detector, save_dir, saved, as_json):
        typer.echo(line, err=True)


def register(app: typer.Typer) -> None:
    app.command()(detect)
