"""``edgepipe bench``: measure the pipeline against the bare model and the physical limits.

It runs the benchmarks of ``benchmarks/`` (installed with edgepipe as ``edgepipe_benchmarks``, so
it works on the device from a wheel as from a checkout) on this machine: throughput of
``edgepipe run`` against a hand-written loop on one video file and against the reference YOLOv5
code's own loop (1280x720, the reference checkpoint), one ipc hop against a memcpy, latency of a
live source, overload, memory, the detector's backends (torch, onnxruntime, OpenVINO fp32/bf16,
time to ready), and the GPU when there is one (CUDA graphs, the stage against the bare graph, 8
sources, one 1280x720 stream with each stage's own rate; ``python -m benchmarks.gpu_check`` runs
those with the CUDA tests in one budgeted run). ``--smoke`` finishes in seconds (CI runs it so the benchmarks never rot); the default takes
minutes; ``--long`` adds the 10-minute drift and memory run. See benchmarks/README.md for the
numbers measured so far and what each one means.
"""

from __future__ import annotations

import json
from typing import Optional

import typer


def bench(
    smoke: bool = typer.Option(False, "--smoke", help="Tiny sizes and short runs: checks that every benchmark works (seconds)."),
    long: bool = typer.Option(False, "--long", help="Latency drift and memory over 10 minutes."),
    only: Optional[str] = typer.Option(
        None, "--only", help="Comma-separated sections: transport, backends, throughput, batching, "
        "latency, overload, memory, model, ops, gpu (default: all)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of the table."),
) -> None:
    """Benchmark this machine: pipeline vs bare model, transport, latency, memory, backends."""
    from edgepipe.cli import fail

    if smoke and long:
        raise fail("--smoke and --long exclude each other")
    try:
        from edgepipe_benchmarks import run as runner
    except ImportError as exc:
        raise fail(f"the benchmarks are not installed with this edgepipe ({exc}); reinstall edgepipe") from None
    try:
        sections = runner.parse_only(only or "")
    except ValueError as exc:
        raise fail(str(exc)) from None
    runner.prepare_process()  # before torch loads: in-process model timings run as the stage does
    try:
        doc = runner.run_all("smoke" if smoke else "long" if long else "full", sections)
    except RuntimeError as exc:  # a daemon or measuring process that failed: one line, then its log
        lines = str(exc).splitlines() or ["benchmark failed"]
        for line in lines[1:]:
            typer.echo(line, err=True)
        raise fail(lines[0]) from None
    typer.echo(json.dumps(doc) if as_json else "\n".join(runner.table(doc)))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
