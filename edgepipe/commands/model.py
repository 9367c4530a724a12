"""`edgepipe weights convert|info`, `edgepipe export` and `edgepipe quantize`: the model owner's commands.

They turn whatever a model owner brings (a reference ``best.pt``, an RGB checkpoint, a state
dict) into edgepipe's safetensors format, say what a weights file holds, and export ONNX. torch
is imported inside the command bodies so that `edgepipe --help` stays fast. Errors are one line
on stderr with exit status 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import typer

_CFG_HELP = "Model config (shipped name such as yolov5n, or a YAML path); only for plain state dicts."
_NC_HELP = "Number of classes; only for plain state dicts (checked against the weights)."


def _fail(message: str) -> typer.Exit:
    from edgepipe.cli import fail

    return fail(message)


def _describe(info: Dict[str, Any]) -> str:
    """A short readable table of inspect_weights()."""
    size_mb = info["file_bytes"] / 1e6
    source = info["source"]
    extras = [f"{info[k]}" if k != "epoch" else f"epoch {info[k]}"
              for k in ("checkpoint_key", "class", "epoch", "cfg") if info.get(k) is not None]
    if extras:
        source += f" ({', '.join(extras)})"
    layout = {"r5.0": "r5.0 (Focus, SPP)", "r6": "r6 (release 6.0+: 6x6 stem, SPPF)"}.get(info["layout"], info["layout"])
    names = info["names"]
    shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
    rows = [
        ("file", f"{info['path']} ({size_mb:.1f} MB)"),
        ("format", source),
        ("layout", layout),
        ("size", f"{info['size']} (depth {info['depth_multiple']}, width {info['width_multiple']})"),
        ("input", f"{info['ch']} channel{'s' if info['ch'] != 1 else ''}, strides {'/'.join(map(str, info['stride']))}"),
        ("classes", f"{info['nc']}: {shown}"),
        ("parameters", f"{info['parameters']:,}"),
        ("GFLOPs", f"{info['gflops']:.1f} at 640x640"),
        ("dtype", f"{info['dtype']}{', fused' if info['fused'] else ''}"),
    ]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def weights_info(
    weights: Path = typer.Argument(..., help="Weights file (.safetensors, .pt) or builtin:demo."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    cfg: Optional[str] = typer.Option(None, "--cfg", help=_CFG_HELP),
    nc: Optional[int] = typer.Option(None, "--nc", min=1, help=_NC_HELP),
) -> None:
    """Say what a weights file holds: layout, size, classes, parameters, GFLOPs at 640, format."""
    from edgepipe.yolo.weights import WeightsError, inspect_weights

    try:
        info = inspect_weights(weights, cfg=cfg, nc=nc)
    except WeightsError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(info) if as_json else _describe(info))


def weights_convert(
    src: Path = typer.Argument(..., metavar="IN", help="Any accepted weights file."),
    dst: Path = typer.Argument(..., metavar="OUT", help="The edgepipe safetensors file to write."),
    gray: bool = typer.Option(
        False, "--gray",
        help="Make a colour model 1-channel: exact for gray input replicated to every channel."),
    cfg: Optional[str] = typer.Option(None, "--cfg", help=_CFG_HELP),
    nc: Optional[int] = typer.Option(None, "--nc", min=1, help=_NC_HELP),
) -> None:
    """Write a weights file as edgepipe safetensors (fp32, architecture and names in metadata)."""
    from edgepipe.yolo.weights import WeightsError, convert

    if dst.suffix.lower() != ".safetensors":
        raise _fail(f"OUT {str(dst)!r}: `weights convert` writes edgepipe safetensors, so OUT must end in "
                    ".safetensors (for ONNX use `edgepipe export`)")
    try:
        model = convert(src, dst, gray=gray, cfg=cfg, nc=nc)
    except WeightsError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {dst}: {exc.strerror or exc}") from None
    typer.echo(f"Wrote {dst}: {model.nc} classes, {'1-channel from colour' if gray else '1-channel'}")


def export(
    weights: Path = typer.Argument(..., help="Weights file (.safetensors, .pt)."),
    fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    imgsz: str = typer.Option("640", "--imgsz", help="Input size: 640 or H,W (multiples of 32)."),
    half: bool = typer.Option(False, "--half", help="float16 graph (input and output float16)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Free batch, height and width."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file (default: WEIGHTS with .onnx)."),
    opset: int = typer.Option(17, "--opset", min=12, max=20, help="ONNX opset."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda:N (where the export traces)."),
    cfg: Optional[str] = typer.Option(None, "--cfg", help=_CFG_HELP),
) -> None:
    """Export a model to ONNX with a 1-channel input, checked against torch with onnxruntime."""
    if fmt.lower() != "onnx":
        raise _fail(f"export format {fmt!r} is not supported; expected onnx")
    from edgepipe.yolo.export import ExportError, export_onnx
    from edgepipe.yolo.weights import WeightsError, load_model

    try:
        source: Any = weights
        if cfg is not None:
            source = load_model(weights, device="cpu", cfg=cfg, half=False)
            output = output or weights.with_suffix(".onnx")
        result = export_onnx(source, output=output, imgsz=imgsz, half=half, dynamic=dynamic,
                             opset=opset, device=device)
    except (WeightsError, ExportError) as exc:
        raise _fail(str(exc)) from None
    from edgepipe.yolo.export import describe_parity

    parity = result["parity"]
    check = ("onnxruntime not installed, not checked" if parity is None else
             f"onnxruntime matches torch within {parity['precision']} tolerance: {describe_parity(parity)}")
    shape = "x".join(str(d) for d in result["input_shape"])
    typer.echo(f"Wrote {result['path']}: input images {shape} {result['dtype']}, opset {result['opset']}; {check}")


def quantize(
    weights: Path = typer.Argument(..., help="Weights file (.safetensors, .pt) or builtin:demo."),
    calib: Path = typer.Option(..., "--calib", help="Folder of your own frames (images): calibration, and every --holdout-th one for the gate."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The int8 .onnx to write (default: WEIGHTS-int8.onnx)."),
    imgsz: str = typer.Option("640", "--imgsz", help="Input size: 640 or H,W (multiples of 32), as the pipeline letterboxes."),
    holdout: int = typer.Option(5, "--holdout", min=0, help="Every Nth frame is held out of calibration for the gate (0: none)."),
    scenes: int = typer.Option(100, "--scenes", min=8, help="Held-out generated scenes for the demo model's mAP gate."),
    cfg: Optional[str] = typer.Option(None, "--cfg", help=_CFG_HELP),
) -> None:
    """Quantize a model to int8 on your frames; written only if the accuracy gate accepts it."""
    from edgepipe.yolo.export import ExportError, parse_imgsz
    from edgepipe.yolo.quantize import QuantizeError
    from edgepipe.yolo.quantize import quantize as run_quantize

    name = str(weights)
    if output is None:
        stem = name[len("builtin:"):] if name.startswith("builtin:") else str(weights.with_suffix(""))
        output = Path(f"{stem}-int8.onnx")
    if output.suffix.lower() != ".onnx":
        raise _fail(f"--output {str(output)!r}: the quantized model is ONNX, so it must end in .onnx")
    try:
        size = parse_imgsz(imgsz)
        done = run_quantize(name, str(calib), str(output), size, holdout, scenes, cfg)
    except (QuantizeError, ExportError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"Calibrated on {done['calibration']} of {done['frames']} frames in {calib}; {done['held_out']} held out")
    for engine, result in done["results"].items():
        typer.echo(f"Gate ({engine}): {result.describe()}: accepted")
    typer.echo(f"Wrote {output}: int8, input {size[1]}x{size[0]} uint8; use it as weights: {output}")


def register(app: typer.Typer) -> None:
    weights_app = typer.Typer(help="Inspect and convert YOLOv5 weights files.", no_args_is_help=True)
    weights_app.command("info")(weights_info)
    weights_app.command("convert")(weights_convert)
    app.add_typer(weights_app, name="weights")
    app.command("export")(export)
    app.command("quantize")(quantize)
