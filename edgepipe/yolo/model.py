"""The YOLOv5 detector assembled from a declarative config: ``build_model``, ``Model``, ``Detect``.

A config is the field's layer table (``[from, repeats, module, args]`` rows under ``backbone``
and ``head``, with ``nc``, ``anchors``, ``depth_multiple``, ``width_multiple``), read from a
shipped YAML (package data), a user's YAML file, or the ``yaml`` dict a reference checkpoint
carries. Module names resolve through an explicit table (:data:`MODULES`); nothing in a config is
ever evaluated. The assembled ``Model`` keeps the reference's parameter and buffer names
(``model.<i>.<sub>``) so that reference state dicts load unchanged, and its Detect head decodes
boxes as in the YOLOv5 releases: ``xy = (2*sigmoid - 0.5 + grid) * stride``,
``wh = (2*sigmoid)^2 * anchor``.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml
from torch import nn

from edgepipe.yolo.common import (
    C3,
    SPP,
    SPPF,
    Bottleneck,
    Concat,
    Conv,
    Focus,
    make_activation,
    upsample,
)

# Config module name -> constructor. The only names a config may use.
MODULES: Dict[str, Callable[..., nn.Module]] = {
    "Conv": Conv,
    "Focus": Focus,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPP": SPP,
    "SPPF": SPPF,
    "Concat": Concat,
    "nn.Upsample": upsample,
    "Upsample": upsample,
    "Detect": None,  # type: ignore[dict-item]  # filled in below, after the class exists
}
# Blocks whose first argument is the output channel count (scaled by width_multiple) and whose
# input channel count is inserted in front of it.
_CHANNEL_BLOCKS = ("Conv", "Focus", "Bottleneck", "C3", "SPP", "SPPF")

# Shipped configs: name -> (file in edgepipe/yolo/configs, size letter or None).
SHIPPED: Dict[str, Tuple[str, Optional[str]]] = {
    "yolov5s-r5.0": ("yolov5s-r5.0.yaml", None),
    "yolov5n": ("yolov5-r6.yaml", "n"),
    "yolov5s": ("yolov5-r6.yaml", "s"),
    "yolov5m": ("yolov5-r6.yaml", "m"),
    "yolov5l": ("yolov5-r6.yaml", "l"),
    "yolov5x": ("yolov5-r6.yaml", "x"),
}
DEFAULT_CFG = "yolov5s-r5.0"


MAX_MULTIPLE = 4.0  # yolov5x is 1.33 / 1.25
MAX_CLASSES = 10000
MAX_CHANNELS = 4096  # yolov5x tops out at 1280
MAX_WEIGHTS = 400_000_000  # estimate below; yolov5x estimates 183M (it has 87M weights)


class ConfigError(ValueError):
    """A model config that cannot be built; the message names the layer or key at fault."""


def make_divisible(x: float, divisor: int = 8) -> int:
    """The smallest multiple of ``divisor`` that is >= x (channel rounding of width_multiple)."""
    return int(math.ceil(x / divisor) * divisor)


class Detect(nn.Module):
    """The detection head: one 1x1 conv per level giving ``na * (5 + nc)`` channels.

    ``anchors`` is a buffer (nl, na, 2) in grid units (pixels / stride) once the Model has set
    ``stride``. Training mode returns the raw per-level tensors (B, na, ny, nx, 5+nc) for the
    loss; eval mode returns one tensor (B, N, 5+nc) with cx, cy, w, h in input pixels and the
    objectness and class scores after sigmoid.
    """

    anchors: torch.Tensor

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = (),
                 inplace: bool = True) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        if len(ch) != self.nl:
            raise ConfigError(f"Detect has {self.nl} anchor levels but {len(ch)} input layers")
        # (nl, na, 2) in pixels until Model divides them by the strides.
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.stride = torch.zeros(self.nl)
        self._strides: List[float] = [0.0] * self.nl  # python floats: traced as constants
        self._grid_cache: Dict[Tuple[Any, ...], Tuple[torch.Tensor, torch.Tensor]] = {}

    def set_stride(self, stride: torch.Tensor) -> None:
        self.stride = stride.detach().float().cpu()
        self._strides = [float(s) for s in self.stride]
        self._grid_cache = {}

    def initialize_biases(self) -> None:
        """Objectness and class priors so that training from scratch starts sane.

        About 8 objects per 640x640 image spread over the level's cells, and class probability
        0.6 / (nc - 0.99), as the field does.
        """
        with torch.no_grad():
            for conv, s in zip(self.m, self._strides):
                b = conv.bias.view(self.na, -1)  # type: ignore[union-attr, operator]
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:5 + self.nc] += math.log(0.6 / (self.nc - 0.99))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        # Release 5.0 also saved anchor_grid (anchors in pixels); we derive it from anchors.
        state_dict.pop(prefix + "anchor_grid", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _grids(self, i: int, nx: int, ny: int, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(1, 1, ny, nx, 2) cell offsets (x, y) and (1, na, 1, 1, 2) anchors in pixels."""
        key = (i, nx, ny, ref.device, ref.dtype)
        tracing = torch.jit.is_tracing()
        if not tracing and key in self._grid_cache:
            return self._grid_cache[key]
        # arange in float32 then cast: ONNX Range has no float16 form (exported --half models)
        yv, xv = torch.meshgrid(torch.arange(ny, device=ref.device, dtype=torch.float32),
                                torch.arange(nx, device=ref.device, dtype=torch.float32), indexing="ij")
        grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).to(ref.dtype)
        anchor_grid = (self.anchors[i] * self._strides[i]).view(1, self.na, 1, 1, 2).to(ref.dtype)
        if not tracing:
            self._grid_cache[key] = (grid, anchor_grid)
        return grid, anchor_grid

    def forward(self, xs: List[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        raw: List[torch.Tensor] = []
        decoded: List[torch.Tensor] = []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            # (B, na*no, ny, nx) -> (B, na, ny, nx, no)
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if self.training:
                raw.append(x)
                continue
            y = x.sigmoid()
            grid, anchor_grid = self._grids(i, nx, ny, y)
            xy = (y[..., 0:2] * 2 - 0.5 + grid) * self._strides[i]
            wh = (y[..., 2:4] * 2) ** 2 * anchor_grid
            decoded.append(torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, self.no))
        if self.training:
            return raw
        return torch.cat(decoded, 1)  # (B, N, 5+nc)


MODULES["Detect"] = Detect


class Model(nn.Module):
    """A YOLOv5 built from a config dict (see :func:`build_model`).

    Attributes: ``model`` (the layers, an nn.Sequential so parameter names read
    ``model.<i>.<sub>``), ``yaml`` (the resolved architecture dict, including ``ch`` and ``nc``),
    ``names`` (class names), ``nc``, ``stride`` (tensor [8, 16, 32] for the default layouts).
    A fresh Model is in training mode, like any nn.Module; call ``.eval()`` for inference.
    """

    def __init__(self, cfg: Dict[str, Any], ch: int = 1, nc: Optional[int] = None) -> None:
        super().__init__()
        d = copy.deepcopy(cfg)
        if nc is not None:
            d["nc"] = int(nc)
        d["ch"] = int(ch)
        self.yaml: Dict[str, Any] = d
        self.model, self.save = parse_model(d, ch)
        self.nc: int = int(d["nc"])
        names = d.get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=_class_index)]
        self.names: List[str] = (
            [str(n) for n in names] if isinstance(names, list) and len(names) == self.nc
            else [f"class{i}" for i in range(self.nc)]
        )
        detect = self.detect
        # Strides from a dry run of the feature layers (eval: BatchNorm statistics untouched).
        side = 256
        was_training = self.training
        self.eval()
        with torch.no_grad():
            feats = self._features(torch.zeros(1, ch, side, side))
        self.train(was_training)
        stride = torch.tensor([side / f.shape[-2] for f in feats])
        detect.anchors /= stride.view(-1, 1, 1)
        detect.set_stride(stride)
        self.stride = stride
        detect.initialize_biases()

    @property
    def detect(self) -> Detect:
        return self.model[-1]  # type: ignore[return-value]

    def _features(self, inp: torch.Tensor) -> List[torch.Tensor]:
        """Run every layer but Detect; return Detect's inputs."""
        outputs: List[Any] = []  # saved layer outputs (None where no later layer reads them)
        layers = list(self.model)
        x: Any = inp
        for m in layers[:-1]:
            f: Any = m.f
            if f != -1:
                x = outputs[f] if isinstance(f, int) else [x if j == -1 else outputs[j] for j in f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return [x if j == -1 else outputs[j] for j in layers[-1].f]  # type: ignore[misc, union-attr]

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """(B, ch, H, W) float in [0, 1], H and W multiples of the largest stride.

        Eval: (B, N, 5+nc). Training: the raw per-level (B, na, ny, nx, 5+nc) tensors.
        Raises ValueError for another shape (the layers would fail later with a cryptic error).
        """
        step = int(self.stride.max())
        if x.dim() != 4 or x.shape[1] != self.yaml["ch"] or x.shape[2] % step or x.shape[3] % step:
            raise ValueError(
                f"model input must be (B, {self.yaml['ch']}, H, W) with H and W multiples of {step}, "
                f"got {tuple(x.shape)}"
            )
        return self.detect(self._features(x))

    def fuse(self) -> Model:
        """Fold every BatchNorm into its convolution, in place (for inference); returns self."""
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        return self

    @property
    def fused(self) -> bool:
        return any(isinstance(m, Conv) and not isinstance(m.bn, nn.BatchNorm2d) for m in self.modules())


def _class_index(key: Any) -> Tuple[int, str]:
    """Sort key for a names dict whose keys may be ints or (after JSON) digit strings."""
    try:
        return int(key), ""
    except (TypeError, ValueError):
        return 1 << 30, str(key)


def gflops(model: nn.Module, imgsz: Union[int, Tuple[int, int]] = 640) -> float:
    """Convolution GFLOPs (2 x multiply-accumulates) of one forward pass at ``imgsz`` (h, w).

    Counted with forward hooks. Sizes that are multiples of 320 run at a tenth of the size and
    scale by 100: every convolution's output is then exactly proportional. Other layers (pooling,
    activations, the Detect decode) are negligible and not counted.
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    factor = 10 if h % 320 == 0 and w % 320 == 0 else 1
    first = next(iter(model.parameters()))
    ch = int(getattr(model, "yaml", {}).get("ch", 1))
    macs = [0]

    def hook(conv: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        assert isinstance(conv, nn.Conv2d)
        kh, kw = conv.kernel_size
        macs[0] += out.numel() * (conv.in_channels // conv.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, ch, h // factor, w // factor, device=first.device, dtype=first.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return 2 * macs[0] * factor * factor / 1e9


def _resolve_arg(a: Any, nc: int, anchors: Any) -> Any:
    # Reference configs name a few symbols as strings; resolved by lookup, never evaluated.
    if isinstance(a, str):
        if a == "nc":
            return nc
        if a == "anchors":
            return anchors
        if a == "None":
            return None
        if a in ("True", "False"):
            return a == "True"
    return a


def parse_model(d: Dict[str, Any], ch: int) -> Tuple[nn.Sequential, List[int]]:
    """Build the layers of config ``d`` for ``ch`` input channels.

    Returns the layers and the sorted indices of layers whose outputs later layers read.
    """
    for key in ("nc", "anchors", "backbone", "head"):
        if key not in d:
            raise ConfigError(f"model config has no {key!r} key (needs nc, anchors, backbone, head)")
    nc = int(d["nc"])
    anchors = d["anchors"]
    gd = float(d.get("depth_multiple", 1.0))
    gw = float(d.get("width_multiple", 1.0))
    # Architecture metadata comes from weights files, which may be hostile: bound the sizes so a
    # few bytes of metadata cannot make us allocate gigabytes before the shape check refuses them.
    if not (0 < gd <= MAX_MULTIPLE and 0 < gw <= MAX_MULTIPLE):
        raise ConfigError(
            f"model config depth_multiple {gd} / width_multiple {gw} out of range (0, {MAX_MULTIPLE}]"
        )
    if not 1 <= nc <= MAX_CLASSES:
        raise ConfigError(f"model config nc {nc} out of range [1, {MAX_CLASSES}]")
    budget = 0  # rough upper bound of the weights about to be allocated
    if isinstance(anchors, int):
        na = anchors
    elif isinstance(anchors, list) and anchors and all(isinstance(a, list) for a in anchors):
        na = len(anchors[0]) // 2
    else:
        raise ConfigError(f"model config 'anchors' must be an int or a list of per-level lists, got {anchors!r}")
    no = na * (nc + 5)
    activation = d.get("activation")
    rows = list(d["backbone"]) + list(d["head"])
    layers: List[nn.Module] = []
    save: List[int] = []
    chs: List[int] = []  # output channels of each layer

    for i, row in enumerate(rows):
        if not (isinstance(row, (list, tuple)) and len(row) == 4):
            raise ConfigError(f"model config layer {i}: expected [from, repeats, module, args], got {row!r}")
        f, n, name, args = row
        if name not in MODULES:
            raise ConfigError(
                f"model config layer {i}: unknown module {name!r}; supported: {', '.join(sorted(MODULES))}"
            )
        froms = [f] if isinstance(f, int) else list(f)
        try:
            in_chs = [ch if (i == 0 and j == -1) else chs[j] for j in froms]
        except (IndexError, TypeError):
            raise ConfigError(f"model config layer {i}: 'from' {f!r} refers to no earlier layer") from None
        args = [_resolve_arg(a, nc, anchors) for a in (args or [])]
        n = max(round(n * gd), 1) if n > 1 else n
        if name in _CHANNEL_BLOCKS:
            c1, c2 = in_chs[0], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if name == "C3":
                args.insert(2, n)
                n = 1
        elif name == "Concat":
            c2 = sum(in_chs)
        elif name == "Detect":
            args.append(in_chs)
            if isinstance(args[1], int):  # anchors learned later: placeholders the weights replace
                args[1] = [[0.0] * (args[1] * 2)] * len(froms)
            c2 = 0
        else:
            c2 = in_chs[0]
        if name in _CHANNEL_BLOCKS:
            budget += int(args[0]) * int(args[1]) * 9 * max(int(n), 1) * (3 if name == "C3" else 1)
            if budget > MAX_WEIGHTS or int(args[1]) > MAX_CHANNELS:
                raise ConfigError(
                    f"model config layer {i} ({name}): {args[1]} output channels make the model "
                    f"larger than edgepipe accepts (at most {MAX_CHANNELS} channels, about "
                    f"{MAX_WEIGHTS // 10**6}M weights)"
                )
        ctor = MODULES[name]
        try:
            m = nn.Sequential(*(ctor(*args) for _ in range(n))) if n > 1 else ctor(*args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model config layer {i} ({name}): bad arguments {args!r}: {exc}") from None
        m.i, m.f = i, f  # type: ignore[assignment]
        layers.append(m)
        save.extend(j % i for j in froms if j != -1)
        chs.append(c2)
    if not isinstance(layers[-1], Detect):
        raise ConfigError("model config: the last layer must be Detect")
    if activation is not None:
        act = make_activation(activation)
        for m in nn.Sequential(*layers).modules():
            if isinstance(m, Conv) and isinstance(m.act, nn.SiLU):
                m.act = copy.deepcopy(act)
    return nn.Sequential(*layers), sorted(set(save))


def _read_package_config(filename: str) -> str:
    if sys.version_info >= (3, 9):
        from importlib.resources import files  # novermin (guarded: 3.9+)

        return (files("edgepipe.yolo") / "configs" / filename).read_text(encoding="utf-8")
    # Python 3.8: importlib.resources cannot reach into the non-package configs/ folder.
    import pkgutil

    data = pkgutil.get_data("edgepipe.yolo", "configs/" + filename)
    if data is None:
        raise ConfigError(f"shipped config {filename} is missing from the installed package")
    return data.decode("utf-8")


def _apply_scale(d: Dict[str, Any], scale: str, origin: str) -> Dict[str, Any]:
    scales = d.pop("scales")
    if scale not in scales:
        raise ConfigError(f"config {origin} has no size {scale!r}; sizes: {', '.join(scales)}")
    d["depth_multiple"], d["width_multiple"] = scales[scale]
    return d


def load_config(cfg: Union[str, Path, Dict[str, Any]]) -> Dict[str, Any]:
    """The architecture dict for ``cfg``: a shipped name (:data:`SHIPPED`), a YAML path, or a dict."""
    if isinstance(cfg, dict):
        d = copy.deepcopy(cfg)
        origin = "dict"
    else:
        key = str(cfg)
        stem = key[:-5] if key.endswith(".yaml") else key
        if stem in SHIPPED and not Path(key).is_file():
            filename, scale = SHIPPED[stem]
            d = yaml.safe_load(_read_package_config(filename))
            return _apply_scale(d, scale, stem) if scale else d
        path = Path(key)
        if not path.is_file():
            raise ConfigError(f"model config {key!r} is neither a file nor a shipped name ({', '.join(SHIPPED)})")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"model config {key}: not valid YAML ({type(exc).__name__})") from None
        origin = key
        if not isinstance(d, dict):
            raise ConfigError(f"model config {key}: expected a mapping, got {type(d).__name__}")
    if "scales" in d and "depth_multiple" not in d:
        scale = d.pop("scale", None)
        if scale is None:
            raise ConfigError(f"config {origin} lists sizes {', '.join(d['scales'])}; say which with a 'scale' key")
        return _apply_scale(d, str(scale), origin)
    d.pop("scales", None)
    return d


def build_model(cfg: Union[str, Path, Dict[str, Any]] = DEFAULT_CFG, ch: int = 1,
                nc: Optional[int] = None) -> Model:
    """Build a YOLOv5 with ``ch`` input channels from ``cfg`` (name, YAML path or dict).

    ``nc=None`` keeps the config's class count. Weights are freshly initialised with the Detect
    bias priors; the model is in training mode.
    """
    return Model(load_config(cfg), ch=ch, nc=nc)
