"""CUDA graphs for the torch backend: capture the forward once per input shape, then replay it.

At batch 1 to 8 a GPU running YOLOv5 eagerly waits for the CPU to launch its kernels (on an
H200, yolov5s fp16 ran 180-235 images/s eagerly at batch 1 and 990 as a replayed graph; 1100-1750
against 3000 at batch 8). A CUDA graph records the kernels of one forward pass on fixed memory and
launches them all with one call. So :class:`GraphCache` keeps one graph per key (batch size,
height, width) with its static input (uint8 (B, H, W) on the device, which the pinned host buffer
is copied into) and its static output (the model's (B, N, 5+nc)):

- batch sizes are captured as powers of two (1, 2, 4, 8, ...), each on the first batch that
  needs it, up to ``max_graphs`` graphs; past that the least recently used one is dropped (each
  holds its own activations' memory);
- a batch between those sizes is either padded to the next one (``pad``: the stale rows of the
  static input are computed and ignored) or run eagerly (``eager``); ``pad`` is the default
  because a replayed graph of 8 costs less than an eager pass of 1 (3000 vs 200 images/s above);
- a capture that fails (an operator that cannot be captured, memory) is logged once and that key
  runs eagerly from then on; :meth:`GraphCache.check` compares graph and eager outputs on the
  warm-up batch once at start-up and turns graphs off (one log line) when they differ by more
  than the precision allows.

Everything CUDA-specific sits behind :class:`CudaGraphRuntime` (a side stream for the warm-up
passes, ``torch.cuda.CUDAGraph`` for the capture), so the cache's logic runs on the CPU in tests
with a stand-in runtime that records the function and re-runs it on replay.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["CudaGraphRuntime", "GraphCache", "GraphError", "PAD_POLICIES", "bucket", "outputs_close"]

log = logging.getLogger(__name__)

PAD_POLICIES = ("pad", "eager")
Key = Tuple[int, int, int]  # (batch, height, width)


def bucket(batch: int) -> int:
    """The captured batch size that holds ``batch`` images: the next power of two."""
    size = 1
    while size < batch:
        size *= 2
    return size


class GraphError(RuntimeError):
    """A graph that cannot be captured or replayed here."""


class CudaGraphRuntime:
    """The CUDA calls of a capture: warm-up passes on a side stream (the caching allocator and
    cuDNN pick their kernels outside the graph), then ``torch.cuda.graph``. Returns the replay
    function and the static output the replays overwrite."""

    def __init__(self, warmup: int = 2) -> None:
        import torch

        self._torch = torch
        self.warmup = warmup

    def capture(self, fn: Callable[[], Any]) -> Tuple[Callable[[], None], Any]:
        torch = self._torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph.replay, out


def outputs_close(got: Any, ref: Any, half: bool) -> Tuple[bool, float, float]:
    """(close, max abs diff, tolerance) for two (B, N, 5+nc) outputs: scores absolutely, boxes
    (pixels) relative to their size; the tolerance fits fp16 (about 3 significant digits) or
    fp32."""
    got, ref = got.float(), ref.float()
    rtol, atol = (1e-2, 1e-2) if half else (1e-4, 1e-4)
    diff = (got - ref).abs()
    allowed = atol + rtol * ref.abs()
    excess = float((diff - allowed).max()) if diff.numel() else 0.0
    return excess <= 0, float(diff.max()) if diff.numel() else 0.0, rtol


class GraphCache:
    """Replayed CUDA graphs of ``forward`` keyed by input shape (see the module docstring).

    ``forward(x)`` maps a uint8 (B, H, W) tensor on ``device`` to the model's output;
    ``new_input(key)`` allocates a static uint8 input of that shape there; ``runtime`` captures
    (the CUDA seam). Calls are sequential (one worker thread), and each caller reads the returned output
    before the next call, which may overwrite it.
    """

    def __init__(self, forward: Callable[[Any], Any], new_input: Callable[[Key], Any], runtime: Any,
                 device: Any, max_graphs: int = 6, pad: str = "pad", half: bool = True,
                 logger: Optional[logging.Logger] = None) -> None:
        if pad not in PAD_POLICIES:
            raise ValueError(f"graph padding {pad!r}: expected one of {', '.join(PAD_POLICIES)}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs} must be at least 1")
        self.forward = forward
        self.new_input = new_input
        self.runtime = runtime
        self.device = device
        self.max_graphs = max_graphs
        self.pad = pad
        self.half = half
        self.log = logger or log
        self.enabled = True
        # key -> (static input, replay, static output), least recently used first (dicts keep order)
        self.graphs: Dict[Key, Tuple[Any, Callable[[], None], Any]] = {}
        self.failed: Dict[Key, str] = {}  # keys whose capture failed: eager from then on
        self.captures = 0
        self.evictions = 0
        self.replays = 0
        self.eager_runs = 0
        self.padded_runs = 0

    def _slot(self, key: Key) -> Optional[Key]:
        """The key of the graph to run a batch of ``key`` on (captured now if need be), or None
        to run it eagerly."""
        b, h, w = key
        if self.pad == "pad":
            slot: Key = (bucket(b), h, w)
        elif b == bucket(b):
            slot = key
        else:
            return None  # 'eager': a batch between the captured sizes runs as it is
        if slot in self.graphs:
            return slot
        if slot in self.failed:
            return None
        return slot if self.capture(slot) else None

    def capture(self, key: Key) -> bool:
        """Capture the graph of ``key`` (evicting the least recently used one when full); False,
        logged once per key, when the capture fails."""
        if key in self.graphs:
            return True
        while len(self.graphs) >= self.max_graphs:
            old = next(iter(self.graphs))
            del self.graphs[old]
            self.evictions += 1
            self.log.info("CUDA graph cache full (%d): dropped batch %d at %dx%d", self.max_graphs, old[0], old[2], old[1])
        try:
            static_in = self.new_input(key)
            replay, static_out = self.runtime.capture(lambda: self.forward(static_in))
        except Exception as exc:  # capture errors come from CUDA, cuDNN and torch alike
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.failed[key] = reason
            self.log.warning("CUDA graph capture failed for batch %d at %dx%d, running it eagerly: %s",
                             key[0], key[2], key[1], reason)
            return False
        self.graphs[key] = (static_in, replay, static_out)
        self.captures += 1
        return True

    def __call__(self, x: Any) -> Any:
        """The model's output for the uint8 (B, H, W) device or pinned host tensor ``x``."""
        key: Key = (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]))
        slot = self._slot(key) if self.enabled else None
        if slot is None:
            self.eager_runs += 1
            return self.forward(x.to(self.device, non_blocking=True))
        static_in, replay, static_out = self.graphs[slot]
        self.graphs[slot] = self.graphs.pop(slot)  # now the most recently used
        static_in[: key[0]].copy_(x, non_blocking=True)
        replay()
        self.replays += 1
        if slot != key:
            self.padded_runs += 1
            return static_out[: key[0]]
        return static_out

    def check(self, x: Any) -> bool:
        """Graph against eager on ``x`` (the warm-up batch), once: graphs stay on only when the
        outputs agree within the precision's tolerance (one log line otherwise)."""
        key: Key = (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]))
        if not self.capture(key):
            return False
        static_in, replay, static_out = self.graphs[key]
        static_in.copy_(x)
        replay()
        got = static_out.clone()
        ref = self.forward(static_in)
        close, diff, tol = outputs_close(got, ref, self.half)
        if not close:
            self.enabled = False
            self.graphs.clear()
            self.log.warning("CUDA graph output differs from the eager forward (max abs diff %.3g, "
                             "relative tolerance %.0e): running eagerly", diff, tol)
        return close

    def stats(self) -> Dict[str, int]:
        return {"graphs": len(self.graphs), "captures": self.captures, "evictions": self.evictions,
                "replays": self.replays, "padded": self.padded_runs, "eager": self.eager_runs,
                "failed": len(self.failed)}
