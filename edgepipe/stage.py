"""The stage contract: what every plugin (first-party or third-party) implements.

A pipeline is a graph of stages named in the config. Each stage is an instance of a class
registered under the ``edgepipe.stages`` entry-point group; the entry-point name is the stage's
``type`` in the config. This module is the whole contract a plugin author needs: read the
docstrings of :class:`Stage`, :class:`Source`, :class:`Processor` and :class:`Sink`.

Writing a stage, in short::

    # my_pkg/brightness.py
    from pydantic import Field
    from edgepipe.stage import Processor, StageConfig

    class BrightnessConfig(StageConfig):
        gain: float = Field(1.0, gt=0, description="Multiply every pixel by this.")

    class Brightness(Processor):
        '''Scales pixel values.'''
        Config = BrightnessConfig

        def process(self, frames):
            for f in frames:
                f.image = (f.image * self.config.gain).clip(0, 255).astype("uint8")
            return frames

    # pyproject.toml
    [project.entry-points."edgepipe.stages"]
    brightness = "my_pkg.brightness:Brightness"
"""

from __future__ import annotations

import abc
import logging
import os
from typing import ClassVar, Dict, List, Optional, Tuple, Type

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from typing_extensions import Annotated

from edgepipe.messages import Frame
from edgepipe.metrics import StageMetrics

__all__ = [
    "DATA_KINDS",
    "EndOfStream",
    "ExistingFile",
    "Processor",
    "Sink",
    "Source",
    "Stage",
    "StageConfig",
    "StageContext",
    "StageError",
]


class StageError(Exception):
    """A stage cannot do its job (device missing, file unreadable...). The message is one line
    naming the thing that failed; the worker logs it and the supervisor decides what to do."""


class EndOfStream(Exception):
    """Raised by :meth:`Source.read` when a finite source (file, images) has no more frames."""


def _existing_file(value: str) -> str:
    if not os.path.isfile(os.path.expanduser(value)):
        raise ValueError("no such file")
    return value


ExistingFile = Annotated[str, AfterValidator(_existing_file)]
"""A config field naming a file that must exist (weights, ...): ``edgepipe validate`` reports a
missing one as ``stages.<name>.<field>: no such file (got '...')``. Relative paths are relative to
the daemon's working directory."""

DATA_KINDS: Tuple[str, ...] = ("frames", "letterboxed", "candidates", "detections")
"""What flows on a link, for the config's kind-fit check (see :attr:`Stage.produces`):
``frames`` raw source images; ``letterboxed`` images resized and padded for the detector (ratio
and pad set); ``candidates`` detector rows above conf_thres (``Frame.candidates``); ``detections``
final boxes in original-frame pixels (``Frame.detections``). Plugins may use other words too."""


class StageConfig(BaseModel):
    """Settings common to every stage; a plugin's ``Config`` subclasses this.

    The registry adds the ``type`` field (a ``Literal`` of the entry-point name) when it builds
    the discriminated union, so plugins do not declare it. Unknown keys are errors.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: List[str] = Field(
        default_factory=list,
        description="Names of the stages whose output this stage consumes (empty for sources).",
    )
    worker: Optional[str] = Field(
        None,
        description="Run this stage in the named worker process together with the other stages "
        "naming the same worker (they then link over inproc://). Default: a process of its own.",
    )
    policy: Optional[str] = Field(
        None,
        pattern="^(latest|block)$",
        description="How this stage's input link behaves when it falls behind: 'latest' takes the "
        "newest frame per source and counts the skipped ones (bounded latency, default when a "
        "live source feeds it), 'block' applies lossless backpressure (default when only finite "
        "sources such as files and images feed it).",
    )
    stall_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds without progress after which /healthz and the watchdog call this "
        "stage stalled.",
    )


class StageContext:
    """What the runtime hands to a stage: its name, the pipeline's name, a logger, its metrics,
    and where a source resumes.

    ``metrics`` is the stage's :class:`edgepipe.metrics.StageMetrics`; the worker already counts
    frames in/out, drops, errors and processing time around every call, so a stage only declares
    and records what is specific to it (reconnects, batch sizes, inference time...). Left None (a
    unit test constructing a stage), :class:`Stage` creates a fresh ``StageMetrics(name, kind)``.
    ``pipeline`` is the config's ``name`` (topics and subjects that must be unique per daemon use
    it). ``runtime_dir`` is the daemon's private directory (ipc sockets live there), None outside
    a daemon. ``resume`` is the frame id a source's first frame must carry (see :class:`Source`):
    0 when the daemon starts, one past the last id it emitted when its worker was restarted.
    """

    def __init__(
        self,
        name: str,
        metrics: Optional[StageMetrics] = None,
        runtime_dir: Optional[str] = None,
        resume: int = 0,
        pipeline: str = "edgepipe",
    ):
        self.name = name
        self.pipeline = pipeline
        self.log = logging.getLogger(f"edgepipe.stage.{name}")
        self.metrics = metrics
        self.runtime_dir = runtime_dir
        self.resume = resume


class Stage(abc.ABC):  # noqa: B024 - abstract through its three kinds
    """Base class of every stage.

    Lifecycle, all in the stage's worker process (a spawned process, never the supervisor),
    all from that worker's single main thread:

    1. ``__init__(config, context)``: cheap; no devices opened, no models loaded. Also called by
       ``edgepipe validate`` and ``edgepipe run``'s pre-flight in the supervisor, so it must not
       import heavy modules (torch) or touch hardware.
    2. ``check()``: pre-flight run by ``edgepipe run`` in the supervisor before any worker starts:
       verify that what the stage needs exists (a weights file, a camera device node, GStreamer
       support) and raise :class:`StageError` with one line if not. Must be quick and side-effect
       free. ``edgepipe validate`` does not call it.
    3. ``start()``: once, in the worker, before the first frame: open devices, load and warm
       models. The worker reports READY to the supervisor only after every stage's ``start``
       returned. Raise :class:`StageError` to fail.
    4. ``read()`` (sources) or ``process()`` (processors, sinks): called repeatedly by the worker
       loop, never concurrently.
    5. ``flush()``: once, at end of stream (every input delivered its end marker, or the source
       ended, or the daemon drains on SIGTERM): return any frames still held (batching stages).
    6. ``stop()``: once, last; release everything. Nothing is called after ``stop``; a stage
       must not keep threads or processes alive past it.

    A worker may be killed at any time (kill -9, OOM): stages must not rely on ``stop`` for
    correctness of data already emitted.

    Frames are :class:`edgepipe.messages.Frame`. A stage may change and return the frames it was
    given (they are its own) but must not keep references to them after returning. Their arrays
    arrive as read-only views of the message buffer (no copy): assign a new array instead of
    writing into one. Arrays a stage emits are sent without copying, so it must not write into
    them after returning them either (allocate a fresh array per frame).

    Threads: ``check`` runs in the supervisor; everything else runs on the worker's one main
    thread. A stage may start its own threads in ``start`` (a grab thread keeping the newest
    camera frame) and must join them in ``stop``; ``self.metrics`` is safe to use from them.
    ``self.log`` lines are one line each, for events (started, reconnected, gave up); per-frame
    numbers belong in ``self.metrics``.

    Metrics: besides what the worker counts for every stage, a stage declares series of its own
    in ``__init__`` or ``start`` through ``self.metrics.counter/gauge/histogram`` (a name
    ``edgepipe_<...>``, a help text, optional label names) and records into what they return
    (see :class:`edgepipe.metrics.StageMetrics`). They appear on ``/metrics`` with the ``stage``
    label and keep adding up across worker restarts. A badly named series, or one that another
    stage declared differently, stops the stage at start with one line naming both.

    Health: a stage that keeps running but cannot do its job (a sink that cannot reach its
    broker, a source whose camera is gone) calls :meth:`report_unhealthy` with the reason, and
    :meth:`report_healthy` once it can again (both are cheap, safe from any thread, and only
    the changes count). ``/healthz`` then answers 503 naming the stage and the reason, the
    systemd status line names it, and ``edgepipe_stage_healthy`` is 0; the watchdog keeps being
    pinged (the process is alive, and restarting it would not bring back a broker).

    Errors: raising :class:`StageError` from ``start``, ``read`` or ``process`` means the stage
    cannot go on: the worker exits and the supervisor restarts it with backoff (at start-up, the
    daemon fails). Any other exception from ``process`` drops that call's frames (counted as
    ``errors{type="process"}`` and ``dropped{reason="error"}``, logged at most every 10 s) and the
    stage goes on; from ``read`` it counts ``errors{type="source"}`` and ``read`` is retried.

    Class attributes a plugin sets: ``Config`` (a :class:`StageConfig` subclass), ``kind``
    (set by the three bases), the class docstring's first line (shown by ``edgepipe plugins``),
    and for the config's kind-fit check ``accepts`` and ``produces`` (words of
    :data:`DATA_KINDS`): ``accepts`` lists what the stage can take on its inputs (empty: anything),
    ``produces`` says what it emits (None: the same kind it received, as a pass-through does; for a
    source, None means "not known statically", which skips the check downstream). ``edgepipe
    validate`` refuses e.g. ``nms`` (accepts candidates) fed by ``letterbox`` (produces
    letterboxed). Batching is driven by the config: a
    processor whose ``Config`` has ``max_batch`` and ``max_wait_ms`` fields gets batches.
    ``keep_original_option`` names a bool field of ``Config`` that makes the stage carry the
    source picture along in ``Frame.original`` (the ``letterbox`` stage's ``keep_original``); see
    :class:`Sink` (``needs_original``) for who turns it on.
    """

    kind: ClassVar[str] = "stage"
    Config: ClassVar[Type[StageConfig]] = StageConfig
    accepts: ClassVar[Tuple[str, ...]] = ()
    produces: ClassVar[Optional[str]] = None
    keep_original_option: ClassVar[Optional[str]] = None

    def __init__(self, config: StageConfig, context: StageContext):
        self.config = config
        self.context = context
        self.name = context.name
        self.log = context.log
        if context.metrics is None:
            context.metrics = StageMetrics(context.name, self.kind)
        self.metrics: StageMetrics = context.metrics

    def output_kind(self) -> Optional[str]:
        """What this stage emits given its config; defaults to :attr:`produces`. Override when the
        config decides it (a ``zmq`` source receiving letterboxed frames from another daemon)."""
        return self.produces

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def check(self) -> None:  # noqa: B027 - an optional hook
        """Pre-flight check in the supervisor (see class docstring)."""

    def addresses(self) -> Dict[str, str]:
        """Where a person or another program reaches this stage once it started: a label and an
        address (``{"live preview": "http://127.0.0.1:8080/"}``, ``{"detections": "tcp://..."}``).
        Called by the worker after ``start()``; ``edgepipe run`` prints them once the daemon is
        ready. Default: none."""
        return {}

    def check_upstream(self, upstream: Dict[str, Stage]) -> None:  # noqa: B027 - an optional hook
        """Static cross-check against the stages upstream of this one: ``upstream`` maps the name
        of every stage this one transitively takes input from to its (unstarted) instance, in
        data-flow order. Called by ``edgepipe validate`` and ``run`` after the graph checks (a
        ``zones`` stage requiring a ``tracker`` before it, class names checked against the
        detector's). Raise ValueError with one line to refuse the config; it is reported as
        ``stages.<name>: <line>``. Must be cheap and open nothing."""

    def start(self) -> None:  # noqa: B027 - an optional hook
        """Open devices, load models; called once in the worker before any frame."""

    def flush(self) -> List[Frame]:
        """Return frames still held at end of stream."""
        return []

    def stop(self) -> None:  # noqa: B027 - an optional hook
        """Release resources; last call."""

    def report_unhealthy(self, reason: str, log: bool = True) -> None:
        """The stage cannot do its job but keeps running; ``reason`` is one line (see the class
        docstring). Logged once per change of reason, unless ``log`` is False (the stage already
        logs that event in words of its own, as a reconnecting camera does)."""
        if log and self.metrics.problem != " ".join(str(reason).split()):
            self.log.warning("Unhealthy: %s", reason)
        self.metrics.report_problem(reason)

    def report_healthy(self, log: bool = True) -> None:
        """The stage can do its job again (after :meth:`report_unhealthy`)."""
        if log and self.metrics.problem is not None:
            self.log.info("Healthy again")
        self.metrics.clear_problem()

    def reconfigure(self, config: StageConfig) -> bool:
        """Apply a changed config in place (SIGHUP). Return True if applied; False (the default)
        makes the supervisor restart this stage's worker with the new config."""
        return False


class Source(Stage):
    """A stage that produces frames (camera, RTSP, file, images, ...).

    ``read()`` is called in a loop by the worker. It returns one new :class:`Frame` (with
    ``source`` set to the stage name, ``frame_id`` increasing from :attr:`resume`, by one per
    frame, and ``timestamp`` the capture time in unix seconds), or ``None`` when no frame is ready
    yet (it
    should then have waited up to about 0.1 s, so the worker can serve control messages), or
    raises :class:`EndOfStream` when a finite source is exhausted. Transient failures (a camera
    that disconnects) are handled inside: reconnect with backoff, count it (the first-party
    sources declare ``edgepipe_source_reconnects_total``), log one line, report it with
    :meth:`Stage.report_unhealthy`, and return ``None`` meanwhile.

    ``live`` tells the runtime the default link policy downstream: live sources (cameras, RTSP,
    real-time synthetic) default to 'latest', finite ones (file, images) to 'block'.

    Restarts: frame ids are per source and only increase, also across a restart of the source's
    worker (a crash, a hang, a reload that replaced the worker). :attr:`resume` is the id the
    first frame must carry: 0 at the daemon's start, after a restart one past the last id the
    previous incarnation emitted (the runtime records each id before the frame leaves). A source
    that can seek also continues at that position (the ``file`` source skips that many frames,
    ``images`` that many files), so a restarted finite source neither repeats nor skips frames
    and 'block' pipelines deliver no duplicates. A reload that changes the source's own settings
    starts it afresh (``resume`` 0). A source ignoring ``resume`` gets one warning line.
    """

    kind: ClassVar[str] = "source"
    produces: ClassVar[Optional[str]] = "frames"

    @property
    def live(self) -> bool:
        return True

    @property
    def resume(self) -> int:
        """The frame id this incarnation's first frame carries (see the class docstring)."""
        return self.context.resume

    def expected_frames(self) -> Optional[int]:
        """For a finite source that knows its length (a file, a folder of images), how many
        frames it delivers in all, counted from the first (also after a restart); None when
        endless or unknown. Called after ``start()``; the live status shows progress and the
        time left."""
        return None

    @abc.abstractmethod
    def read(self) -> Optional[Frame]:
        """Return the next frame, None when none is ready yet, or raise EndOfStream."""


class Processor(Stage):
    """A stage that transforms frames (letterbox, detector, NMS, ...).

    ``process(frames)`` receives a non-empty list of frames and returns the frames to pass
    downstream (possibly fewer, e.g. while a batch fills; those come back later or from
    ``flush``). ``max_batch`` (a config field a processor may define) bounds the list length; the
    worker gathers frames up to ``max_batch`` waiting at most ``max_wait_ms`` when the config has
    those fields, and otherwise passes one frame at a time.
    """

    kind: ClassVar[str] = "processor"

    @abc.abstractmethod
    def process(self, frames: List[Frame]) -> List[Frame]:
        """Transform frames; return those to pass downstream."""


class Sink(Stage):
    """A stage that consumes frames and emits nothing downstream (ZeroMQ PUB, jsonl, video...).

    ``process(frames)`` receives a non-empty list of frames and delivers them. A sink that cannot
    keep up is what 'latest' links protect against; a sink must not buffer without bound.

    ``needs_original`` asks for the full-resolution source picture (``Frame.original``), to draw
    annotated images on: a class attribute, or set on the instance in ``__init__`` when the
    config decides (``zmq_pub`` needs it only with ``frames_fps``). When the config is loaded,
    every stage upstream of such a sink that has a :attr:`Stage.keep_original_option` (the
    ``letterbox`` stage) gets that option set to true, unless the config sets it explicitly
    (``keep_original: false`` saves the bandwidth; the sink then draws on what it gets). A
    detector fed straight from a source letterboxes by itself and carries no original: put a
    ``letterbox`` stage before it.
    """

    kind: ClassVar[str] = "sink"
    produces: ClassVar[Optional[str]] = None
    needs_original: ClassVar[bool] = False

    @abc.abstractmethod
    def process(self, frames: List[Frame]) -> None:
        """Deliver frames."""


KINDS: Dict[str, Type[Stage]] = {"source": Source, "processor": Processor, "sink": Sink}
