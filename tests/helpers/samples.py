"""The first-party stages as their sample.yaml files show them, and the series they declare.

A sample may be a stage snippet whose inputs name stages it leaves out (a sink fed by 'nms');
:func:`sample_pipeline` supplies those from a standard chain. :func:`exported_series` is every
family a daemon of first-party stages can export: the core families plus the series each
first-party stage declares when built from its sample (what dashboards and alert rules may use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from edgepipe.config import Pipeline, load_config, parse_config
from edgepipe.metrics import METRIC_NAMES
from edgepipe.registry import Registry

REPO = Path(__file__).resolve().parents[2]
SAMPLES: List[Path] = sorted(REPO.glob("plugins/*/*/sample.yaml"))

CHAIN: Dict[str, Dict[str, Any]] = {
    "scene": {"type": "synthetic", "fps": 10},
    "prep": {"type": "letterbox", "inputs": ["scene"]},
    "detector": {"type": "yolov5", "inputs": ["prep"], "weights": None},
}


def sample_pipeline(path: Path, registry: Optional[Registry] = None) -> Pipeline:
    """The validated pipeline of a sample (or shipped config), completed with :data:`CHAIN`
    when it names inputs it does not define."""
    registry = registry or Registry.discover()
    data = yaml.safe_load(path.read_text())
    stages = data["stages"]
    missing = {i for s in stages.values() for i in s.get("inputs", []) if i not in stages}
    if missing:
        assert path in SAMPLES, f"{path}: names stages it does not define: {sorted(missing)}"
        data = dict(data, stages={**CHAIN, **{m: {"type": "nms", "inputs": ["detector"]} for m in missing}, **stages})
        return parse_config(data, registry, env={})
    return load_config(str(path), registry, env={})


def exported_series() -> Dict[str, str]:
    """Name -> help of every family: core, and declared by a first-party stage's sample."""
    names = dict(METRIC_NAMES)
    registry = Registry.discover()
    for path in SAMPLES:
        for stage in sample_pipeline(path, registry).instances.values():
            for name, series in stage.metrics.series.items():
                names.setdefault(name, series.help)
    return names
