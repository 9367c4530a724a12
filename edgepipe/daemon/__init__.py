"""The daemon behind ``edgepipe run``, as parts with one job each.

- :mod:`~edgepipe.daemon.supervisor`: the main loop and the signals (handlers only set flags);
- :mod:`~edgepipe.daemon.process`: one object per worker process, owning its lifecycle;
- :mod:`~edgepipe.daemon.plan`: the typed plan a worker runs, built by the supervisor;
- :mod:`~edgepipe.daemon.control`: the control messages both sides speak;
- :mod:`~edgepipe.daemon.stages`: what the supervisor knows of each stage (metrics, state);
- :mod:`~edgepipe.daemon.health` and :mod:`~edgepipe.daemon.reload`: health and the reload
  diff, pure functions of their inputs;
- :mod:`~edgepipe.daemon.status`: the status line, the live table, the summary;
- :mod:`~edgepipe.daemon.exposition`: the ``/metrics`` and ``/healthz`` endpoint;
- :mod:`~edgepipe.daemon.worker` and :mod:`~edgepipe.daemon.runner`: the worker process and one
  stage's step inside it.

Importing this package imports none of them: a worker process loads only what it runs.
"""
