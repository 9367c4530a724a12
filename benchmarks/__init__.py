"""edgepipe's benchmarks: the pipeline against the bare model and the physical limits.

``python -m benchmarks.run`` (``make bench``; ``--smoke`` for a run of seconds, ``--long`` for
the 10-minute memory and drift run) and ``edgepipe bench`` run every section and print a table
or, with ``--json``, one document; each module also runs alone (``python -m
benchmarks.bench_transport``...). Sections: ``throughput`` (bench_pipeline: bare loop vs
``edgepipe run`` on one video file), ``transport`` (one ipc hop vs memcpy), ``latency``,
``overload`` and ``memory`` (bench_latency: live sources through a daemon), ``backends`` (torch
vs onnxruntime on the CPU), ``gpu`` (fp16/fp32, batches, CUDA graphs; only with CUDA),
``model`` (bench_model: fused vs unfused) and ``ops`` (bench_ops: NMS, letterbox). Numbers and
the machine they come from are in benchmarks/README.md.
"""
