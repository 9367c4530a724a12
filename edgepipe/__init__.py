"""edgepipe: a streaming 1-channel YOLOv5 detection daemon for edge devices.

Stages (sources, processors, sinks) are plugins run in supervised worker processes linked by
ZeroMQ; detections are published on ZeroMQ topics; every stage is measured in Prometheus.
"""

__version__ = "0.1.0"
