"""What every benchmark shares: statistics, the machine's description, a daemon run, memory.

A benchmark section returns a dict with ``figures`` (name -> positive number: medians, ratios,
rates, sizes), ``fractions`` (name -> number in [0, 1], e.g. a drop rate), ``trends`` (name ->
signed number, e.g. a drift slope) and ``setup`` (what was measured: model, sizes, repeats), so
that ``edgepipe bench --json`` has one shape a test can check and a reader can diff.

:class:`DaemonRun` runs ``python -m edgepipe run`` on a config dict, as a user would, in its own
process group, and reads what the stages publish from a jsonl sink: every detection message
carries its capture ``timestamp`` and ``timing.latency`` (publish minus capture), so publish
times and frame ages come from the daemon's own clocks, with nothing listening on a socket.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import yaml

__all__ = [
    "DaemonRun",
    "Section",
    "machine",
    "mode_arguments",
    "output",
    "median",
    "memory_of_daemon",
    "percentile",
    "run_module",
    "slope_per_minute",
    "steady_rate",
    "write_video",
]

Section = Dict[str, Any]
_READY = re.compile(r"Ready: ")
PACKAGE = __package__ or "benchmarks"


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def steady_rate(times: Sequence[float]) -> float:
    """Items per second between the first and the last completion time: (n - 1) / span, so the
    time to fill a pipeline before its first output does not count."""
    if len(times) < 2 or times[-1] <= times[0]:
        raise ValueError(f"need at least two distinct completion times, got {len(times)}")
    return (len(times) - 1) / (times[-1] - times[0])


def slope_per_minute(t: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` against ``t`` (seconds), per minute."""
    tt = np.asarray(t, dtype=np.float64)
    if len(tt) < 3 or np.ptp(tt) == 0:
        return 0.0
    return float(np.polyfit(tt - tt[0], np.asarray(y, dtype=np.float64), 1)[0] * 60.0)


def mode_arguments(parser: Any, long: bool = True) -> None:
    """--smoke (and --long) and --json, the options every benchmark takes."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true", help="tiny sizes and short runs: check that it works")
    if long:
        group.add_argument("--long", action="store_true", help="the 10-minute latency drift and memory run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def output(doc: Any, table: Callable[[Any], List[str]], as_json: bool) -> int:
    """Print ``doc`` as JSON or as its table; the exit status 0."""
    print(json.dumps(doc) if as_json else "\n".join(table(doc)))
    return 0


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, Any]:
    """The machine and software the numbers come from."""
    import cv2
    import zmq

    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "libzmq": zmq.zmq_version(),
        "load_average_1min": load_average(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for name in ("torch", "onnxruntime"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def write_video(path: Path, width: int, height: int, frames: int, fps: float = 10.0, seed: int = 0) -> Path:
    """An MPEG-4 file of ``frames`` synthetic scenes (moving shapes on a noisy background), BGR."""
    import cv2

    from edgepipe.scenes import SceneStream

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an mp4v video to {str(path)!r}")
    scenes = SceneStream(width, height, seed=seed)
    for _ in range(frames):
        gray, _truth = scenes.next()
        writer.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def run_module(module: str, args: Sequence[str], env: Optional[Dict[str, str]] = None,
               unset: Sequence[str] = (), timeout: float = 900.0) -> Dict[str, Any]:
    """Run ``python -m <this package>.<module> ARGS`` in a fresh interpreter (its own thread and
    library settings; ``env`` added to ours, ``unset`` removed) and return the JSON document on
    the last line of its stdout."""
    root = str(Path(__file__).resolve().parents[1])
    full_env = dict(os.environ, **(env or {}))
    for name in unset:
        full_env.pop(name, None)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", f"{PACKAGE}.{module}", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=root,
    )
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{PACKAGE}.{module} {' '.join(args)} failed ({proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ processes, memory


def _daemon_processes(supervisor: int) -> Dict[int, str]:
    """The supervisor and its live child processes (the workers): pid -> process title."""
    found: Dict[int, str] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes().decode("ascii", "replace")
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z" and supervisor in (int(entry), int(ppid)):
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found


def _kib(path: str, key: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_of_daemon(supervisor: int, pipeline: str) -> Dict[str, Dict[str, float]]:
    """Process name -> {"rss_mib", "pss_mib"} for a daemon's supervisor and every worker.

    Names come from the process titles (``edgepipe: <pipeline>/<worker>``, ``... supervisor``).
    RSS counts shared pages (torch's libraries, mapped once per process) in every process that
    maps them; PSS splits them between the sharers, so PSS adds up to what the daemon costs."""
    prefix = f"edgepipe: {pipeline}"
    out: Dict[str, Dict[str, float]] = {}
    for pid, title in _daemon_processes(supervisor).items():
        if title.startswith(prefix + "/"):
            name = title[len(prefix) + 1 :]
        elif title.startswith(prefix):
            name = "supervisor"
        else:
            name = f"pid{pid}"
        rss = _kib(f"/proc/{pid}/status", "VmRSS:")
        pss = _kib(f"/proc/{pid}/smaps_rollup", "Pss:")
        if rss is None:
            continue
        out[name] = {"rss_mib": round(rss / 1024, 1), "pss_mib": round((pss or rss) / 1024, 1)}
    return out


# ------------------------------------------------------------------------------------- daemons


class DaemonRun:
    """``python -m edgepipe run`` on ``config`` (a dict), in its own process group.

    The log goes to ``<workdir>/daemon.log``. Use as a context manager: leaving the block stops
    the daemon (SIGTERM, then SIGKILL to its whole group after ``stop_timeout``), so no process
    outlives a benchmark.
    """

    def __init__(self, config: Dict[str, Any], workdir: Path, stop_timeout: float = 30.0) -> None:
        self.config = dict(config)
        self.config.setdefault("metrics", {"listen": "127.0.0.1:0"})
        self.name = str(self.config.get("name", "edgepipe"))
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "pipeline.yaml"
        self.path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = self.workdir / "daemon.log"
        self.stop_timeout = stop_timeout
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> DaemonRun:
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgepipe", "run", str(self.path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(self.workdir), start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        finally:
            log.close()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _fail(self, what: str) -> RuntimeError:
        tail = "\n".join(self.log.strip().splitlines()[-15:])
        return RuntimeError(f"daemon {self.name!r}: {what}; its log ends:\n{tail}")

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``condition()`` until truthy; RuntimeError (with the log) on timeout or exit."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                value = condition()
                if value:
                    return value
                raise self._fail(f"exited with {self.proc.returncode} before {what}")
            if time.monotonic() > deadline:
                raise self._fail(f"no {what} within {timeout:g} s")
            time.sleep(0.05)

    def check_running(self) -> None:
        """RuntimeError (with the log) if the daemon has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise self._fail(f"exited with {self.proc.returncode} while it should run")

    def wait_ready(self, timeout: float = 300.0) -> None:
        self.wait_for(lambda: _READY.search(self.log), timeout, "'Ready:' line")

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._fail(f"still running after {timeout:g} s") from None
        if code != 0:
            raise self._fail(f"exited with {code}")
        return code

    def memory(self) -> Dict[str, Dict[str, float]]:
        assert self.proc is not None
        return memory_of_daemon(self.proc.pid, self.name)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its session is left
        except OSError:
            pass  # none: the usual case
        if self.proc.poll() is None:
            self.proc.wait(10)


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """Detection messages a jsonl sink wrote so far (a half-written last line is left out)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def publish_times(messages: Sequence[Dict[str, Any]]) -> List[float]:
    """Unix publish time of each message: capture timestamp + capture-to-publish latency."""
    return [m["timestamp"] + m["timing"]["latency"] for m in messages]


def tempdir(prefix: str) -> tempfile.TemporaryDirectory:
    # Short paths: ipc:// socket names must fit in 107 bytes.
    return tempfile.TemporaryDirectory(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None)


# ------------------------------------------------------------------------------ per-stage rates

_SAMPLE = re.compile(r'^(edgepipe_(?:stage_processing_seconds_sum|stage_frames_received_total|'
                     r'stage_frames_sent_total|source_frames_read_total))\{([^}]*)\} ([0-9.eE+-]+)$')


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a daemon's metrics endpoint)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, timeout: float = 2.0) -> str:
    """The daemon's /metrics text, or '' when it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return ""


def stage_rates(metrics_text: str) -> Dict[str, float]:
    """Each stage's own rate: frames per second of its own processing time (frames it handled /
    sum of ``edgepipe_stage_processing_seconds``), what it could do if it never waited for its
    inputs or outputs. For a source that is its read (decode); a batching detector's frames
    count one by one."""
    sums: Dict[str, float] = {}
    frames: Dict[str, float] = {}
    for line in metrics_text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in m.group(2).split(",") if "=" in kv)
        stage = labels.get("stage", "").strip('"')
        if m.group(1).endswith("_sum"):
            sums[stage] = float(m.group(3))
        else:
            frames[stage] = max(frames.get(stage, 0.0), float(m.group(3)))
    return {s: frames[s] / sums[s] for s in sums if sums[s] > 0 and frames.get(s)}
