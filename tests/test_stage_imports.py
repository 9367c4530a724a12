"""Which first-party processors pull torch in: only the inference stage. A fresh interpreter
imports ``yolov5``, ``nms`` and ``letterbox``, runs the yolov5 pre-flight and a frame through
letterbox and nms, and torch is still not loaded, so a worker without the detector stays small."""

from __future__ import annotations

import subprocess
import sys


def test_only_the_inference_stage_imports_torch():
    code = (
        "import sys\n"
        "from edgepipe.stage import StageContext\n"
        "from edgepipe_plugins.processors.yolov5 import YoloV5Stage, YoloV5Config\n"
        "from edgepipe_plugins.processors.nms import NmsStage, NmsConfig\n"
        "from edgepipe_plugins.processors.letterbox import LetterboxStage, LetterboxConfig\n"
        "from edgepipe.messages import Frame\n"
        "import numpy as np\n"
        "YoloV5Stage(YoloV5Config(), StageContext('d')).check()\n"
        "lb = LetterboxStage(LetterboxConfig(imgsz=64), StageContext('l')); lb.start()\n"
        "n = NmsStage(NmsConfig(), StageContext('n')); n.start()\n"
        "f = lb.process([Frame('c', 0, 0.0, image=np.zeros((48, 64), np.uint8))])[0]\n"
        "f.candidates = np.zeros((0, 85), np.float32)\n"
        "n.process([f])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
