"""Weights files: read every accepted kind, build the model, write edgepipe's own format.

Accepted inputs, recognised by their content, not their name:

(a) edgepipe's format: safetensors whose metadata holds ``"format": "edgepipe.yolov5"``, the
    architecture dict (``arch``, JSON), class ``names`` (JSON list), ``stride``, ``ch``, ``nc``
    and ``fused``. Tensors keep the model's dtype (fp32 from :func:`convert`; fp16 when a half
    model is saved);
(b) checkpoints of the reference YOLOv5 trainer, releases 5.0 to 7.0 (a ``torch.save`` zip of
    whole module objects under ``ema`` or ``model``), read by :mod:`edgepipe.yolo.unpickler`,
    which never imports or runs anything they name;
(c) a plain state dict (torch zip of tensors, also read by the restricted unpickler, or a
    safetensors file without our metadata) plus a config: ``cfg`` names it, or, for the shipped
    layouts, it is recognised from the tensor shapes.

Everything else is refused with a one-line :class:`WeightsError` that says what the file is and
what is accepted.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from edgepipe.yolo.builtin import resolve_weights
from edgepipe.yolo.model import (
    SHIPPED,
    ConfigError,
    Model,
    gflops,
    load_config,
    make_divisible,
)
from edgepipe.yolo.unpickler import (
    ModulePlaceholder,
    PickleFormatError,
    UnsafePickleError,
    load_torch_archive,
)

log = logging.getLogger(__name__)

FORMAT = "edgepipe.yolov5"
FORMAT_VERSION = "1"
_RESERVED_KEYS = ("format", "format_version", "arch", "names", "stride", "ch", "nc", "fused", "dtype")
ACCEPTED = (
    "accepted: edgepipe safetensors, a YOLOv5 training checkpoint (releases 5.0-7.0), "
    "or a state_dict with a config (cfg / --cfg)"
)
PathLike = Union[str, "os.PathLike[str]"]


class WeightsError(ValueError):
    """A weights file that cannot be used; the message is one line naming the file and the fault."""


@dataclass
class Weights:
    """What a weights file holds, before a model is built from it."""

    state_dict: Dict[str, torch.Tensor]
    arch: Dict[str, Any]
    nc: int
    ch: int
    source: str  # "edgepipe safetensors", "reference checkpoint", "state_dict", ...
    names: Optional[List[str]] = None
    fused: bool = False
    detail: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading


def _sniff(path: Path) -> str:
    """A coarse kind from the first bytes: zip, safetensors, legacy-torch, pickle, or a description."""
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "a directory"
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        return "safetensors"
    if head.startswith(b"\x80\x02\x8a\x0a"):
        return "legacy-torch"
    if len(head) >= 2 and head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    if path.suffix.lower() == ".onnx":
        return "an ONNX model"
    return f"not a known weights format (starts with {head[:8]!r})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _names_list(names: Any, nc: int) -> Optional[List[str]]:
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            return None
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    if names is not None:
        log.warning("Ignoring class names %.60r: they do not fit a model with nc=%d", names, nc)
    return None


def _layers(arch: Dict[str, Any]) -> List[Any]:
    return list(arch.get("backbone", [])) + list(arch.get("head", []))


def _stem_weight_key(arch: Dict[str, Any]) -> Tuple[str, int]:
    """(name of the first convolution's weight, input channels per image channel) for the stem."""
    rows = _layers(arch)
    stem = rows[0][2] if rows and isinstance(rows[0], (list, tuple)) and len(rows[0]) == 4 else None
    if stem == "Focus":
        return "model.0.conv.conv.weight", 4
    if stem == "Conv":
        return "model.0.conv.weight", 1
    raise WeightsError(f"unsupported stem layer {stem!r} (expected Focus or Conv)")


def _complete(sd: Dict[str, torch.Tensor], arch: Dict[str, Any], nc: Optional[int], source: str,
              label: str, names: Any = None, detail: Optional[Dict[str, Any]] = None) -> Weights:
    """Fill in nc, ch and fusion from the tensors themselves (they are what must fit)."""
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{label}: state entry {str(bad[0])[:60]!r} is not a named tensor")
    last = len(_layers(arch)) - 1
    head_w, anchors = sd.get(f"model.{last}.m.0.weight"), sd.get(f"model.{last}.anchors")
    if head_w is None or anchors is None or anchors.dim() != 3:
        raise WeightsError(f"{label}: no Detect layer 'model.{last}' (weights and anchors) in the {source}")
    file_nc = head_w.shape[0] // anchors.shape[1] - 5
    if nc is not None and int(nc) != file_nc:
        raise WeightsError(f"{label}: nc={nc} was asked for but the Detect layer has {file_nc} classes")
    key, per_channel = _stem_weight_key(arch)
    if key not in sd:
        raise WeightsError(f"{label}: the first layer's weight {key!r} is missing")
    ch = sd[key].shape[1] // per_channel
    arch = dict(arch)
    arch["nc"] = file_nc
    fused = not any(".bn." in k for k in sd)
    return Weights(sd, arch, file_nc, ch, source, _names_list(names, file_nc), fused, detail or {})


def _guess_config(sd: Dict[str, torch.Tensor]) -> Optional[str]:
    """The shipped config whose shapes a plain state dict has, from its stem and depth."""
    if "model.0.conv.conv.weight" in sd:
        candidates = ["yolov5s-r5.0"]
    elif "model.0.conv.weight" in sd and sd["model.0.conv.weight"].shape[-1] == 6:
        candidates = [n for n, (f, _) in SHIPPED.items() if f == "yolov5-r6.yaml"]
    else:
        return None
    for name in candidates:
        arch = load_config(name)
        key, _ = _stem_weight_key(arch)
        width = make_divisible(64 * float(arch.get("width_multiple", 1.0)), 8)
        if sd[key].shape[0] == width and _bottlenecks(sd, 4) == _depth(arch, 4):
            return name
    return None


def _depth(arch: Dict[str, Any], layer: int) -> int:
    n = _layers(arch)[layer][1]
    return max(round(n * float(arch.get("depth_multiple", 1.0))), 1) if n > 1 else n


def _bottlenecks(sd: Dict[str, torch.Tensor], layer: int) -> int:
    prefix = f"model.{layer}.m."
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _from_state_dict(sd: Dict[str, torch.Tensor], cfg: Any, nc: Optional[int], label: str,
                     source: str) -> Weights:
    if cfg is None:
        cfg = _guess_config(sd)
        if cfg is None:
            raise WeightsError(f"{label} is a plain {source} of an unrecognised layout; name its config (cfg / --cfg)")
    try:
        arch = load_config(cfg)
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None
    w = _complete(sd, arch, nc, source, label)
    w.detail["cfg"] = str(cfg)
    return w


def _placeholder_state_dict(obj: ModulePlaceholder, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a pickled module tree, under their dotted names."""
    out: Dict[str, torch.Tensor] = {}
    st = obj.state
    skip = st.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (st.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise WeightsError(f"{obj.class_path} holds a {type(t).__name__} as {prefix}{name}")
            out[prefix + name] = t
    for name, child in (st.get("_modules") or {}).items():
        if isinstance(child, ModulePlaceholder):
            out.update(_placeholder_state_dict(child, f"{prefix}{name}."))
    return out


def _from_torch_object(obj: Any, cfg: Any, nc: Optional[int], label: str) -> Weights:
    module: Optional[ModulePlaceholder] = None
    key = None
    if isinstance(obj, ModulePlaceholder):
        module = obj
    elif isinstance(obj, dict):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), ModulePlaceholder):
                module = obj[key]
                break
        else:
            for candidate in (obj, obj.get("state_dict"), obj.get("model")):
                if isinstance(candidate, dict) and candidate and all(
                        isinstance(v, torch.Tensor) for v in candidate.values()):
                    return _from_state_dict(dict(candidate), cfg, nc, label, "state_dict")
            keys = ", ".join(repr(k) for k in list(obj)[:6])
            raise WeightsError(f"{label} is a torch file holding a dict (keys {keys}), not a YOLOv5 checkpoint; {ACCEPTED}")
    if module is None:
        raise WeightsError(f"{label} is a torch file holding a {type(obj).__name__}, not a YOLOv5 checkpoint; {ACCEPTED}")
    cls = module.class_path
    if cls not in ("models.yolo.Model", "models.yolo.DetectionModel"):
        raise WeightsError(f"{label} holds a {cls}, not a YOLOv5 detection model ({ACCEPTED})")
    arch = module.state.get("yaml")
    if not isinstance(arch, dict):
        raise WeightsError(f"{label}: the checkpoint's model has no architecture dict ('yaml')")
    detail: Dict[str, Any] = {"checkpoint_key": key, "class": cls}
    if isinstance(obj, dict):
        for k in ("epoch", "date"):
            if isinstance(obj.get(k), (int, str)):
                detail[k] = obj[k]
    return _complete(_placeholder_state_dict(module), arch, nc, "reference checkpoint", label,
                     names=module.state.get("names"), detail=detail)


def _read_safetensors(path: Path, cfg: Any, nc: Optional[int], label: str) -> Weights:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # the Rust reader raises its own error types
        raise WeightsError(f"{label}: damaged safetensors file ({_first_line(exc)})") from None
    if meta.get("format") != FORMAT:
        return _from_state_dict(sd, cfg, nc, label, "safetensors state_dict")
    try:
        arch = json.loads(meta["arch"])
        names = json.loads(meta["names"])
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{label}: edgepipe metadata key {_first_line(exc)} is missing or not JSON") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{label}: edgepipe format version {meta.get('format_version')!r}; this edgepipe reads {FORMAT_VERSION}")
    if not isinstance(arch, dict):
        raise WeightsError(f"{label}: edgepipe metadata 'arch' is not a mapping")
    return _complete(sd, arch, nc, "edgepipe safetensors", label, names=names)


def weights_path(ref: PathLike) -> Path:
    """A weights reference as a file path: ``builtin:<name>`` is the packaged model
    (:func:`edgepipe.yolo.builtin.resolve_weights`, the one resolver), anything else a path."""
    try:
        return Path(resolve_weights(str(ref)))
    except ValueError as exc:
        raise WeightsError(str(exc)) from None


def read_weights(path: PathLike, cfg: Any = None, nc: Optional[int] = None) -> Weights:
    """Read any accepted weights file into :class:`Weights` (tensors on the CPU, no model yet).

    ``cfg`` and ``nc`` matter for plain state dicts only (see the module docstring). ``path``
    may name a packaged model as ``builtin:<name>`` (:mod:`edgepipe.yolo.builtin`).
    """
    p = weights_path(path)
    label = str(p)
    kind = _sniff(p)
    if kind == "missing":
        raise WeightsError(f"weights file {label} not found")
    if kind == "safetensors":
        return _read_safetensors(p, cfg, nc, label)
    if kind == "zip":
        try:
            obj = load_torch_archive(label)
        except UnsafePickleError as exc:
            raise WeightsError(f"refusing to load {label}: {exc}") from None
        except PickleFormatError as exc:
            raise WeightsError(f"{label}: {exc}; {ACCEPTED}") from None
        return _from_torch_object(obj, cfg, nc, label)
    if kind == "legacy-torch":
        raise WeightsError(f"{label} uses torch's legacy (pre-1.6) format; re-save it with torch>=1.6 ({ACCEPTED})")
    if kind == "pickle":
        raise WeightsError(f"{label} is a bare pickle, not a torch archive; {ACCEPTED}")
    raise WeightsError(f"{label} is {kind}; {ACCEPTED}")


# ----------------------------------------------------------------------------- building


def _check_fits(model: Model, sd: Dict[str, torch.Tensor], label: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.endswith(".anchor_grid")]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{k} is {list(sd[k].shape)}, the architecture needs {list(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
        raise WeightsError(f"{label}: weights do not fit the architecture: {'; '.join(parts)}")


def build(weights: Weights, label: str = "weights") -> Model:
    """The model (CPU, fp32, eval) that ``weights`` describes, with its tensors loaded."""
    try:
        model = Model(weights.arch, ch=weights.ch, nc=weights.nc)
    # RuntimeError: the dry run of a damaged architecture (mismatched channels, unknown modes).
    except (ConfigError, ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        raise WeightsError(f"{label}: cannot build the architecture: {_first_line(exc)}") from None
    model.eval()
    if weights.fused:
        model.fuse()
    _check_fits(model, weights.state_dict, label)
    model.load_state_dict(weights.state_dict)
    if weights.names:
        model.names = list(weights.names)
    return model


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """The one place a device name becomes a torch device, for the stage, ``detect``, ``export``
    and the benchmarks: "auto" -> cuda:0 when CUDA is available, else cpu; "0" -> cuda:0 (the
    reference's spelling); "cuda:N" must exist. WeightsError (one line) otherwise."""
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    spec = f"cuda:{device}" if str(device).isdigit() else device
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise WeightsError(f"unknown device {str(device)!r} (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise WeightsError(f"unknown device {str(device)!r} (expected auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightsError(f"device {str(device)!r} requested but CUDA is not available here (use device: auto or cpu)")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise WeightsError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        if dev.index is None:
            dev = torch.device("cuda", 0)
    return dev


def load_model(path: PathLike, device: Union[str, torch.device] = "auto", fuse: bool = True,
               half: Optional[bool] = None, cfg: Any = None, nc: Optional[int] = None,
               channels_last: bool = False) -> Model:
    """A 1-channel model from any accepted weights file, in eval mode on ``device``.

    ``fuse`` folds BatchNorm into the convolutions (same outputs, faster). ``half`` defaults to
    True on CUDA and False on the CPU. ``cfg``/``nc`` are used for plain state dicts only.
    Raises WeightsError (one line) for anything that cannot be loaded, including a model with
    more than one input channel (convert it with ``edgepipe weights convert --gray``).
    """
    dev = resolve_device(device)
    label = str(path)
    w = read_weights(path, cfg=cfg, nc=nc)
    if w.ch != 1:
        raise WeightsError(
            f"{label} has {w.ch} input channels; edgepipe runs 1-channel models: convert it with "
            f"`edgepipe weights convert --gray {label} OUT.safetensors`"
        )
    model = build(w, label)
    if fuse:
        model.fuse()
    if half is None:
        half = dev.type == "cuda"
    model.to(dev)
    if half:
        model.half()
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- writing


def current_umask() -> int:
    """This process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_model(model: Model, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``model`` in edgepipe's safetensors format, tensors in the model's own dtype.

    ``metadata`` adds string entries; the format's own keys cannot be overridden. The file is
    written to a temporary name and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    extra = dict(metadata or {})
    clash = [k for k in extra if k in _RESERVED_KEYS]
    if clash:
        raise WeightsError(f"metadata key {clash[0]!r} is reserved by the weights format")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise WeightsError("metadata must map strings to strings")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()})
    meta = dict(extra)
    meta.update({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": json.dumps(model.yaml, default=str),
        "names": json.dumps(list(model.names)),
        "stride": json.dumps([float(s) for s in model.stride]),
        "ch": str(model.yaml.get("ch", 1)),
        "nc": str(model.nc),
        "fused": "true" if model.fused else "false",
        "dtype": ",".join(dtypes),
    })
    dst = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=str(dst.parent or "."))
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the
        # umask), so that the systemd service's dynamic user can read what an admin wrote.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def gray_state_dict(weights: Weights) -> Dict[str, torch.Tensor]:
    """The state dict of the 1-channel model equal to ``weights`` on gray replicated to all channels.

    conv(replicate(g)) = sum over colours c of W[:, c] * g, so the first convolution's weights are
    summed over the colour channels. Focus feeds its conv 4 space-to-depth slices, each holding
    every colour (channel j*ch + c), so the sum runs within each slice.
    """
    key, slices = _stem_weight_key(weights.arch)
    sd = dict(weights.state_dict)
    w = sd[key].double()
    c2, cin, kh, kw = w.shape
    sd[key] = w.view(c2, slices, cin // slices, kh, kw).sum(2).float()
    return sd


def convert(src: PathLike, dst: PathLike, gray: bool = False, cfg: Any = None,
            nc: Optional[int] = None) -> Model:
    """Write any accepted weights file as edgepipe safetensors (fp32); returns the model written.

    ``gray`` turns a model with colour input into the 1-channel model with exactly the same
    outputs for a gray image replicated to its channels (see :func:`gray_state_dict`).
    """
    label = str(src)
    w = read_weights(src, cfg=cfg, nc=nc)
    if gray:
        if w.ch == 1:
            raise WeightsError(f"{label} already has 1 input channel; drop --gray")
        w.state_dict, w.ch = gray_state_dict(w), 1
    elif w.ch != 1:
        raise WeightsError(f"{label} has {w.ch} input channels; add --gray to make it a 1-channel model")
    model = build(w, label).float()
    save_model(model, dst, metadata={"converted_from": Path(src).name, "source_format": w.source})
    return model


# ----------------------------------------------------------------------------- inspecting

_SIZES = {(0.33, 0.25): "n", (0.33, 0.5): "s", (0.67, 0.75): "m", (1.0, 1.0): "l", (1.33, 1.25): "x"}


def layout_of(arch: Dict[str, Any]) -> str:
    """"r5.0" (Focus + SPP), "r6" (6x6 stem + SPPF, releases 6.0-7.0) or "custom"."""
    modules = [row[2] for row in _layers(arch) if isinstance(row, (list, tuple)) and len(row) == 4]
    if modules and modules[0] == "Focus" and "SPP" in modules:
        return "r5.0"
    if modules and modules[0] == "Conv" and "SPPF" in modules:
        return "r6"
    return "custom"


def size_of(arch: Dict[str, Any]) -> str:
    gd, gw = float(arch.get("depth_multiple", 1.0)), float(arch.get("width_multiple", 1.0))
    for (d, w), letter in _SIZES.items():
        if abs(gd - d) < 1e-6 and abs(gw - w) < 1e-6:
            return f"yolov5{letter}"
    return f"custom (depth {gd}, width {gw})"


def inspect_weights(path: PathLike, cfg: Any = None, nc: Optional[int] = None) -> Dict[str, Any]:
    """What a weights file holds: layout, size, nc, names, parameters, GFLOPs at 640, format.

    The weights are loaded into the model, so a file that passes is a file that loads.
    """
    w = read_weights(path, cfg=cfg, nc=nc)
    model = build(w, str(path))
    file = weights_path(path)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in w.state_dict.values() if v.is_floating_point()})
    info: Dict[str, Any] = {
        "path": str(path),
        "file": str(file),
        "file_bytes": file.stat().st_size,
        "source": w.source,
        "layout": layout_of(w.arch),
        "size": size_of(w.arch),
        "depth_multiple": float(w.arch.get("depth_multiple", 1.0)),
        "width_multiple": float(w.arch.get("width_multiple", 1.0)),
        "ch": w.ch,
        "nc": model.nc,
        "names": list(model.names),
        "parameters": sum(p.numel() for p in model.parameters()),
        "gflops": round(gflops(model, 640), 2),
        "stride": [int(s) for s in model.stride],
        "dtype": ",".join(dtypes),
        "fused": w.fused,
    }
    info.update(w.detail)
    return info
