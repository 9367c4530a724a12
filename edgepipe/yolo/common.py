"""The building blocks of YOLOv5, one class per block, with the field's argument names.

The blocks follow the architecture described in the YOLOv5 releases (Jocher et al., 2020-2022),
itself built from CSPNet (Wang et al., 2019) cross-stage partial blocks and the SPP of He et al.
(2014). Attribute names (``conv``, ``bn``, ``cv1``, ``m``, ...) are part of the contract: they make
the parameter names of a reference checkpoint (``model.2.cv1.conv.weight``) load unchanged.
Argument names follow the field: ``c1`` input channels, ``c2`` output channels, ``k`` kernel,
``s`` stride, ``p`` padding, ``g`` groups, ``e`` expansion ratio, ``n`` repeats.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

# BatchNorm settings the reference trainer applies to every BatchNorm2d after building the model;
# the fused weights (and therefore the outputs) depend on eps.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(k: Union[int, Sequence[int]], p: Optional[Union[int, Sequence[int]]] = None):
    """'Same' padding for odd kernels when ``p`` is not given."""
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def make_activation(spec: Optional[str]) -> nn.Module:
    """The activation a config names; SiLU when it names none.

    Accepts the spellings found in reference configs: ``nn.SiLU()``, ``nn.ReLU()``,
    ``nn.LeakyReLU(0.1)``, ``nn.Hardswish()``, ``nn.Identity()``; parsed, never evaluated.
    """
    if spec is None:
        return nn.SiLU()
    text = str(spec).strip()
    name, _, rest = text.partition("(")
    name = name.strip()
    if name.startswith("nn."):
        name = name[3:]
    arg = rest.rstrip(")").strip()
    if name == "LeakyReLU":
        try:
            return nn.LeakyReLU(float(arg) if arg else 0.01)
        except ValueError:
            pass
    elif name in ("SiLU", "ReLU", "Hardswish", "Identity") and arg == "":
        return getattr(nn, name)()
    raise ValueError(
        f"unsupported activation {text!r}; expected nn.SiLU(), nn.ReLU(), nn.LeakyReLU(<slope>), "
        "nn.Hardswish() or nn.Identity()"
    )


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation; after :meth:`fuse`, Conv2d (bias) -> act."""

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: Optional[int] = None,
        g: int = 1,
        act: Union[bool, str] = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act: nn.Module
        if act is True:
            self.act = nn.SiLU()
        elif act is False:
            self.act = nn.Identity()
        else:
            self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        """Fold the BatchNorm into the convolution (inference only; idempotent).

        Afterwards the block holds ``conv`` with a bias and no ``bn``, so its parameter names
        are ``conv.weight`` and ``conv.bias``.
        """
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        self.conv = fuse_conv_and_bn(self.conv, self.bn)
        self.bn = nn.Identity()


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d equal to ``bn(conv(x))`` in eval mode (computed in float64, stored as conv's dtype)."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.requires_grad_(False)
    assert fused.bias is not None
    w = conv.weight.detach().double()
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    fused.weight.copy_(w * scale.view(-1, 1, 1, 1))
    fused.bias.copy_(bn.bias.detach().double() + (b - bn.running_mean.double()) * scale)
    return fused


class Focus(nn.Module):
    """Release 5.0 stem: space-to-depth (2x2 pixels into channels), then a Conv.

    The four slices are concatenated in the order (even row, even col), (odd row, even col),
    (even row, odd col), (odd row, odd col), each with all ``c1`` input channels, so input
    channel ``c`` of slice ``j`` is channel ``j * c1 + c`` of the conv.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: Optional[int] = None,
                 g: int = 1, act: Union[bool, str] = True) -> None:
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, c1, H, W) -> (B, 4*c1, H/2, W/2)
        return self.conv(torch.cat(
            [x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


class Bottleneck(nn.Module):
    """1x1 Conv to ``c2*e`` channels, 3x3 Conv back to ``c2``, plus the input when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with 3 convolutions: ``cv3(cat(m(cv1(x)), cv2(x)))``, ``m`` = n Bottlenecks."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling (release 5.0): parallel stride-1 max pools of sizes ``k``."""

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13)) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPF(nn.Module):
    """Fast SPP (release 6.0+): three chained max pools of size k, equal to SPP(k, 2k-1, 3k-2)."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels by default)."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


def upsample(size: Optional[int] = None, scale_factor: Optional[float] = 2,
             mode: str = "nearest") -> nn.Upsample:
    """The head's upsampling layer (``nn.Upsample`` in configs); nearest by default."""
    return nn.Upsample(size=size, scale_factor=scale_factor, mode=mode)
