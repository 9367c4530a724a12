"""What the fault tests share: the real detection pipeline as a config, reading a jsonl sink's
output as it grows, a test video file, and the process checks (zombies, orphans) that a test
asserts after it has killed something."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import zmq
from helpers.daemon import Daemon, process_group_members

from edgepipe.messages import Frame, decode


def detection_pipeline(out: Path, name: str = "fault", imgsz: int = 64, **source: Any) -> Dict[str, Any]:
    """source -> letterbox -> yolov5 (yolov5n, untrained, ``imgsz`` px, CPU) -> nms -> jsonl, one
    worker per stage. ``source`` replaces the synthetic source's settings (``type`` included)."""
    scene = source or {"type": "synthetic", "width": 64, "height": 64, "fps": 15}
    return {
        "name": name,
        "stages": {
            "scene": scene,
            "prep": {"type": "letterbox", "inputs": ["scene"], "imgsz": imgsz},
            "det": {"type": "yolov5", "inputs": ["prep"], "cfg": "yolov5n", "imgsz": imgsz, "device": "cpu",
                    "threads": 1, "conf_thres": 0.01},
            "post": {"type": "nms", "inputs": ["det"], "conf_thres": 0.01},
            "out": {"type": "jsonl", "inputs": ["post"], "path": str(out)},
        },
        # Short ipc paths: a pytest tmp dir can be too deep for sun_path.
        "runtime": {"dir": tempfile.mkdtemp(prefix="ep-", dir="/tmp")},
    }


def jsonl(path: Path, final: bool = False) -> List[Dict[str, Any]]:
    """The lines of a jsonl sink's file, each whole, parseable JSON. While the daemon runs
    (``final`` false) a last line may be in the middle of being written (a long line is not
    written in one piece) and is left out; once it has exited the file must end with a newline."""
    if not path.exists():
        return []
    text = path.read_text()
    if final:
        assert text == "" or text.endswith("\n"), f"{path} ends in a partial line"
    lines = text.split("\n")[:-1]  # the part after the last newline is unfinished
    return [json.loads(line) for line in lines]


def write_video(path: Path, frames: int, width: int = 64, height: int = 48, fps: float = 25.0) -> None:
    """An MJPG AVI whose frame i is a flat gray of 8*i % 256 (OpenCV writes MJPG on its own)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), f"cannot write {path}"
    for i in range(frames):
        writer.write(np.full((height, width, 3), (8 * i) % 256, np.uint8))
    writer.release()


def proc_stat(pid: int) -> Optional[List[str]]:
    """Fields of /proc/<pid>/stat after the command name (state first), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def children(pid: int) -> Dict[int, str]:
    """Child pid -> state letter (Z for a zombie) of every child of ``pid``."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields and int(fields[1]) == pid:
                out[int(entry)] = fields[0]
    return out


def assert_workers_clean(d: Daemon, workers: int) -> None:
    """The supervisor has exactly ``workers`` live children and no zombie, and its process group
    holds nothing else (a worker's orphan would stay in the group)."""
    kids = children(d.pid)
    assert "Z" not in kids.values(), f"zombie children: {kids}"
    assert len(kids) == workers, kids
    assert sorted(process_group_members(d.pid)) == sorted([d.pid, *kids]), kids


class FrameSink:
    """The PULL end a daemon's ``zmq_push`` sink connects to, read in a thread: per frame (arrival
    time, frame id, capture time). ``hwm`` bounds what queues here; ``delay`` makes it a slow
    reader (seconds per frame); :meth:`pause`/:meth:`resume` stop and restart reading. With
    ``close_on_end`` it closes its socket once an end marker has arrived, as a ``zmq`` source with
    ``stop_on_eos`` does (a ``zmq_push`` sink stays connected until then)."""

    def __init__(self, endpoint: str, hwm: int = 1000, delay: float = 0.0, close_on_end: bool = False) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.delay = delay
        self.close_on_end = close_on_end
        self.frames: List[Tuple[float, int, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reading = threading.Event()
        self._reading.set()
        self.ended = threading.Event()  # the producer's end-of-stream marker arrived
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._reading.wait(0.1) or not self.sock.poll(100):
                continue
            item = decode(self.sock.recv_multipart())
            if isinstance(item, Frame):
                with self._lock:
                    self.frames.append((time.time(), item.frame_id, item.timestamp))
            else:
                if self.close_on_end:
                    self.sock.close(linger=0)
                    self._stop.set()
                self.ended.set()
            if self.delay:
                time.sleep(self.delay)

    def pause(self) -> None:
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def since(self, t: float) -> List[Tuple[float, int, float]]:
        """Frames captured after unix time ``t``."""
        with self._lock:
            return [f for f in self.frames if f[2] > t]

    def wait_end(self, timeout: float = 30.0) -> bool:
        """Wait until the end marker has been read: a daemon that exited may still have frames
        on their way through the socket buffers, and this reader takes them one at a time."""
        return self.ended.wait(timeout)

    def ids(self) -> List[int]:
        with self._lock:
            return [f[1] for f in self.frames]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.ctx.term()
        if self.endpoint.startswith("ipc://") and os.path.exists(self.endpoint[6:]):
            os.unlink(self.endpoint[6:])
