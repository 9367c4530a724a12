"""Config loading: interpolation, per-plugin validation, graph cross-checks, one-line errors.

The stage classes here are registered through ``Registry.from_classes`` (no installed metadata);
the CLI tests at the end run ``edgepipe validate`` for real against the installed plugins.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import List, Optional

import pytest
from pydantic import Field

from edgepipe.config import ConfigError, interpolate, load_config, parse_config
from edgepipe.messages import Frame
from edgepipe.registry import Registry
from edgepipe.stage import ExistingFile, Processor, Sink, Source, StageConfig


class CamConfig(StageConfig):
    fps: float = Field(30.0, gt=0, le=240, description="Frames per second.")
    device: str = Field("0", description="Device.")


class Cam(Source):
    """A live camera."""

    Config = CamConfig

    def read(self) -> Optional[Frame]:
        return None


class FileConfig(StageConfig):
    path: str = Field(..., description="A video.")


class Video(Source):
    """A finite file."""

    Config = FileConfig

    @property
    def live(self) -> bool:
        return False

    def read(self) -> Optional[Frame]:
        return None


class LetterboxConfig(StageConfig):
    imgsz: int = Field(640, ge=32, description="Size.")


class Letterbox(Processor):
    """Letterbox."""

    Config = LetterboxConfig
    accepts = ("frames",)
    produces = "letterboxed"

    def process(self, frames: List[Frame]) -> List[Frame]:
        return frames


class DetConfig(StageConfig):
    weights: Optional[ExistingFile] = Field(None, description="Weights.")
    conf_thres: float = Field(0.25, ge=0, le=1, description="Confidence.")
    max_batch: int = Field(1, ge=1, description="Batch.")
    max_wait_ms: float = Field(5, ge=0, description="Wait.")


class Det(Processor):
    """Detector."""

    Config = DetConfig
    accepts = ("letterboxed",)
    produces = "candidates"

    def process(self, frames: List[Frame]) -> List[Frame]:
        return frames


class NmsConfig(StageConfig):
    conf_thres: float = Field(0.25, ge=0, le=1, description="Confidence.")
    iou_thres: float = Field(0.45, ge=0, le=1, description="IoU.")


class Nms(Processor):
    """NMS."""

    Config = NmsConfig
    accepts = ("candidates",)
    produces = "detections"

    def process(self, frames: List[Frame]) -> List[Frame]:
        return frames


class Pub(Sink):
    """Publisher."""

    accepts = ("detections",)

    def process(self, frames: List[Frame]) -> None:
        pass


REGISTRY = Registry.from_classes(
    {"camera": Cam, "file": Video, "letterbox": Letterbox, "yolov5": Det, "nms": Nms, "zmq_pub": Pub}
)


def chain(**overrides: dict) -> dict:
    stages = {
        "cam": {"type": "camera"},
        "lb": {"type": "letterbox", "inputs": ["cam"], "imgsz": 320},
        "detector": {"type": "yolov5", "inputs": ["lb"]},
        "post": {"type": "nms", "inputs": ["detector"]},
        "pub": {"type": "zmq_pub", "inputs": ["post"]},
    }
    for name, settings in overrides.items():
        if settings is None:
            del stages[name]
        else:
            stages[name] = settings
    return {"name": "t", "stages": stages}


def errors_of(data: object, env: Optional[dict] = None) -> List[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, REGISTRY, env or {})
    return info.value.errors


def test_valid_chain_gets_policies_and_kinds():
    p = parse_config(chain(), REGISTRY, {})
    assert list(p.stages) == ["cam", "lb", "detector", "post", "pub"]
    assert p.stages["lb"].imgsz == 320
    assert p.stages["detector"].type == "yolov5"
    # A live camera upstream: every link defaults to 'latest'.
    assert p.policies == {"cam": "block", "lb": "latest", "detector": "latest", "post": "latest", "pub": "latest"}
    assert p.output_kinds["post"] == "detections"
    assert p.workers() == {n: [n] for n in p.stages}


def test_finite_sources_default_to_block_and_explicit_policy_wins():
    data = chain(cam={"type": "file", "path": "x.mp4"})
    data["stages"]["pub"]["policy"] = "latest"
    p = parse_config(data, REGISTRY, {})
    assert p.policies["lb"] == "block" and p.policies["pub"] == "latest"


def test_out_of_range_value_names_path_and_value():
    data = chain(post={"type": "nms", "inputs": ["detector"], "iou_thres": 1.5})
    assert errors_of(data) == [
        "stages.post.iou_thres: Input should be less than or equal to 1 (got 1.5)"
    ]


def test_unknown_type_lists_known_ones():
    data = chain(post={"type": "nmz", "inputs": ["detector"]})
    assert errors_of(data) == [
        "stages.post.type: 'nmz' is not a stage type; known: camera, file, letterbox, nms, yolov5, zmq_pub"
    ]


def test_unknown_key_shows_allowed_keys():
    data = chain(post={"type": "nms", "inputs": ["detector"], "iou_thresh": 0.5})
    (line,) = errors_of(data)
    assert line.startswith("stages.post.iou_thresh: unknown key; allowed: ")
    assert "iou_thres" in line.split("allowed: ")[1].split(", ")


def test_wrong_type_and_several_errors_at_once():
    data = chain(lb={"type": "letterbox", "inputs": ["cam"], "imgsz": "big"})
    data["metrics"] = {"listen": "nowhere"}
    errs = errors_of(data)
    assert "stages.lb.imgsz: Input should be a valid integer, unable to parse string as an integer (got 'big')" in errs
    assert "metrics.listen: expected HOST:PORT, such as 127.0.0.1:9310, [::1]:9310 or :9310 (all addresses) (got 'nowhere')" in errs
    assert len(errs) == 2


def test_missing_weights_file(tmp_path):
    data = chain(detector={"type": "yolov5", "inputs": ["lb"], "weights": str(tmp_path / "nope.pt")})
    assert errors_of(data) == [f"stages.detector.weights: no such file (got {str(tmp_path / 'nope.pt')!r})"]
    (tmp_path / "w.pt").write_bytes(b"x")
    data["stages"]["detector"]["weights"] = str(tmp_path / "w.pt")
    assert parse_config(data, REGISTRY, {}).stages["detector"].weights == str(tmp_path / "w.pt")


def test_dangling_input():
    data = chain(post={"type": "nms", "inputs": ["detectr"]})
    errs = errors_of(data)
    assert errs[0] == "stages.post.inputs: 'detectr' is not a stage; known: cam, lb, detector, post, pub"


def test_cycle_is_named():
    data = chain(lb={"type": "letterbox", "inputs": ["cam", "detector"]})
    assert errors_of(data) == ["stages.lb.inputs: cycle lb -> detector -> lb"]


def test_source_inputs_and_processor_without_inputs():
    data = chain(cam={"type": "camera", "inputs": ["pub"]}, lb={"type": "letterbox"})
    errs = errors_of(data)
    assert "stages.cam.inputs: a source takes no inputs (got ['pub'])" in errs
    assert "stages.lb.inputs: a processor needs at least one input" in errs
    assert "stages.cam.inputs: 'pub' is a sink; sinks emit nothing" in errs


def test_source_that_reaches_no_sink():
    data = chain(cam2={"type": "camera"})
    assert errors_of(data) == ["stages.cam2: source 'cam2' reaches no sink"]


def test_kinds_must_fit():
    # NMS straight after the letterbox: it needs a detector's candidates.
    data = chain(post={"type": "nms", "inputs": ["lb"]}, detector=None)
    assert errors_of(data) == [
        "stages.post.inputs: 'lb' emits letterboxed, but nms accepts candidates"
    ]


def test_interpolation():
    errs: List[str] = []
    tree = {"a": "${X}", "b": ["${Y:-7}", "p${X}q"], "c": "$${X}", "d": 3}
    out = interpolate(tree, {"X": "1"}, "", errs)
    assert out == {"a": "1", "b": ["7", "p1q"], "c": "${X}", "d": 3} and errs == []
    interpolate({"stages": {"cam": {"device": "${CAM}"}}}, {}, "", errs)
    assert errs == ["stages.cam.device: environment variable 'CAM' is not set (in '${CAM}')"]


def test_interpolated_values_are_validated_with_their_types():
    data = chain(cam={"type": "camera", "fps": "${FPS:-15}"})
    assert parse_config(data, REGISTRY, {}).stages["cam"].fps == 15.0
    assert parse_config(data, REGISTRY, {"FPS": "5"}).stages["cam"].fps == 5.0
    assert errors_of(data, {"FPS": "fast"}) == [
        "stages.cam.fps: Input should be a valid number, unable to parse string as a number (got 'fast')"
    ]


def test_top_level_problems():
    assert errors_of([1, 2]) == ["config: expected a mapping at the top level, got list"]
    assert errors_of({"name": "x"}) == ["stages: required key missing"]
    assert errors_of({"stages": {}})[0].startswith("stages: Dictionary should have at least 1 item")
    assert errors_of({"stages": {"a b": {"type": "camera"}}}) == [
        "stages.a b: a stage name is 1-63 letters, digits, '_' or '-', starting with a letter or digit"
    ]
    errs = errors_of(dict(chain(), runtime={"stop_timeout": 0, "colour": 1}))
    assert sorted(errs) == [
        "runtime.colour: unknown key",
        "runtime.stop_timeout: Input should be greater than 0 (got 0)",
    ]


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages:\n  cam: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), REGISTRY, {})
    (line,) = info.value.errors
    assert line.startswith(f"{path}:4:1: invalid YAML: ")
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.yaml"), REGISTRY, {})
    assert info.value.errors == [f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"]


def test_config_model_schema_is_a_discriminated_union():
    model, errors = REGISTRY.config_model()
    assert errors == []
    schema = model.model_json_schema()
    stages = schema["properties"]["stages"]["additionalProperties"]
    assert stages["discriminator"]["propertyName"] == "type"
    assert set(stages["discriminator"]["mapping"]) == {"camera", "file", "letterbox", "yolov5", "nms", "zmq_pub"}
    # The union validates a whole config on its own too.
    cfg = model.model_validate(chain())
    assert type(cfg.stages["post"]).__name__ == "NmsSettings"


def _validate_cli(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return subprocess.run(
        [sys.executable, "-m", "edgepipe", "validate", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_validate_cli_reports_unknown_type(tmp_path):
    r = _validate_cli(
        tmp_path,
        """
        name: t
        stages:
          post: {type: nmz}
        """,
    )
    assert r.returncode == 1
    line = r.stderr.strip()
    assert line.startswith("edgepipe: error: stages.post.type: 'nmz' is not a stage type; known: ")
    assert "yolov5" in line and "synthetic" in line


def test_validate_is_static_and_never_imports_torch():
    """Validating the shipped configs imports every plugin they name, but not torch (only the
    detector's worker does), and opens no device."""
    code = (
        "import sys; from edgepipe.config import load_config\n"
        "for c in ('configs/synthetic.yaml', 'configs/camera.yaml', 'configs/multi-camera.yaml'):\n"
        "    load_config(c)\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'onnxruntime') if m in sys.modules))"
    )
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


class NeedsNms(Sink):
    """A sink that only works behind an nms stage (a stage-specific cross-check)."""

    def check_upstream(self, upstream):
        if not any(isinstance(s, Nms) for s in upstream.values()):
            raise ValueError(f"needs an nms stage before it; upstream: {', '.join(upstream)}")
        assert list(upstream) == ["cam", "lb", "detector", "post"]  # data-flow order

    def process(self, frames: List[Frame]) -> None:
        pass


def test_a_stage_cross_checks_its_upstream_statically():
    registry = Registry.from_classes({**{n: p.load() for n, p in REGISTRY.plugins.items()}, "needs_nms": NeedsNms})
    ok = chain(pub={"type": "needs_nms", "inputs": ["post"]})
    assert "pub" in parse_config(ok, registry, {}).stages
    bad = chain(pub={"type": "needs_nms", "inputs": ["detector"]}, post=None)
    with pytest.raises(ConfigError) as info:
        parse_config(bad, registry, {})
    assert info.value.errors == ["stages.pub: needs an nms stage before it; upstream: cam, lb, detector"]
