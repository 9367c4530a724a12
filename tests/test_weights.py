"""Weights files: our safetensors format, reference training checkpoints read with the restricted
unpickler (and hostile pickles refused before anything runs), plain state dicts, --gray
conversion, and the `edgepipe weights` commands."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from helpers.yolo import gray_batch, max_rel_err, randomize

from edgepipe.yolo.model import Model, build_model, gflops
from edgepipe.yolo.weights import (
    WeightsError,
    convert,
    inspect_weights,
    load_model,
    read_weights,
    save_model,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
EDGEPIPE = [sys.executable, "-m", "edgepipe"]


@pytest.fixture(scope="module")
def ref(ref_fixture_path):
    return torch.load(ref_fixture_path, weights_only=True)


# ----------------------------------------------------------------------------- a reference checkpoint

REFERENCE_CLASSES = {
    # our class name -> (module the reference trainer's class lives in, its name)
    "Model": ("models.yolo", "Model"),
    "Detect": ("models.yolo", "Detect"),
    "Conv": ("models.common", "Conv"),
    "Focus": ("models.common", "Focus"),
    "C3": ("models.common", "C3"),
    "Bottleneck": ("models.common", "Bottleneck"),
    "SPP": ("models.common", "SPP"),
    "SPPF": ("models.common", "SPPF"),
    "Concat": ("models.common", "Concat"),
}


def _disguise(models: List[Model], model_class: str) -> Dict[str, types.ModuleType]:
    """Re-class every block as a throwaway class claiming to live in the reference's modules.

    Returns the fake modules that must be in sys.modules while pickling (the pickler checks that
    each class can be found under its name); the loader must not need them.
    """
    fake = {"models": types.ModuleType("models"), "models.yolo": types.ModuleType("models.yolo"),
            "models.common": types.ModuleType("models.common")}
    made: Dict[type, type] = {}
    for m in (mod for model in models for mod in model.modules()):
        cls = type(m)
        if cls.__name__ not in REFERENCE_CLASSES:
            continue  # torch.nn layers pickle under their own names, as in real checkpoints
        if cls not in made:
            module, name = REFERENCE_CLASSES[cls.__name__]
            name = model_class if name == "Model" else name
            made[cls] = type(name, (cls,), {"__module__": module, "__qualname__": name})
            setattr(fake[module], name, made[cls])
        m.__class__ = made[cls]
    return fake


class _Evil:
    """Pickles as a call of os.system (what a hostile checkpoint would contain)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_reference_checkpoint(path: Path, model: Model, *, numpy_core: str = "numpy._core",
                               model_class: str = "Model", names_as_dict: bool = True,
                               extra: object = None) -> None:
    """A checkpoint shaped like the reference trainer's (7.0 keys plus 5.0's), written by torch.save."""
    model = copy.deepcopy(model).half().eval()
    model.detect._grid_cache = {}
    model.names = {i: n for i, n in enumerate(model.names)} if names_as_dict else model.names
    model.hyp = {"lr0": 0.01, "momentum": 0.937, "anchor_t": 4.0, "fl_gamma": 0.0}
    model.class_weights = torch.arange(1.0, model.nc + 1)  # a plain attribute: .half() leaves it fp32
    model.gr = 1.0
    ema = copy.deepcopy(model)
    fake = _disguise([model, ema], model_class)
    ckpt = {
        "epoch": 41,
        "best_fitness": np.float64(0.4321),  # numpy scalar
        "training_results": "      0/299     3.1G   0.1155   0.0734\n",  # 5.0
        "model": model,
        "ema": ema,
        "updates": 4321,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "nesterov": True, "params": [0, 1]}]},
        "wandb_id": None,
        "opt": {"weights": "yolov5s.pt", "imgsz": 640, "rect": False, "device": "", "single_cls": False,
                "hyp": {"lr0": 0.01}, "save_dir": "runs/train/exp", "freeze": [0]},
        "git": {"remote": "https://example.invalid/yolov5", "branch": "master", "commit": "abc123"},
        "date": "2023-01-01T00:00:00",
        "results": np.arange(21, dtype=np.float32).reshape(3, 7),  # numpy array
        "maps": np.zeros(model.nc),
        "counts": np.int64(7),
        "classes_seen": {"cat", "dog"},  # a set
        "frozen": frozenset({1, 2}),
        "blob": b"\x00\x01bytes",
        "extra": extra,
    }
    saved = dict(sys.modules)
    try:
        sys.modules.update(fake)
        buf = io.BytesIO()
        torch.save(ckpt, buf)
    finally:
        for name in fake:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)
    data = buf.getvalue()
    if numpy_core != "numpy._core":  # spell numpy the way numpy 1.x does (GLOBAL opcodes are text)
        data = _rewrite_pickle(data, b"cnumpy._core.multiarray\n", f"c{numpy_core}.multiarray\n".encode())
    path.write_bytes(data)


def _rewrite_pickle(archive: bytes, old: bytes, new: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(info.filename, data)
    return out.getvalue()


def write_pickle_archive(path: Path, pickle_bytes: bytes) -> None:
    """A torch-style zip archive whose data.pkl is exactly ``pickle_bytes``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")


@pytest.fixture(scope="module")
def small_model() -> Model:
    return randomize(build_model("yolov5n", nc=3), seed=3).eval()


# ----------------------------------------------------------------------------- our format


def test_fixture_round_trip_through_safetensors(ref, tmp_path):
    model = build_model()
    model.load_state_dict(ref["state_dict"])
    path = tmp_path / "yolov5s.safetensors"
    save_model(model.eval(), path, metadata={"note": "fixture"})
    for fuse in (False, True):
        loaded = load_model(path, device="cpu", fuse=fuse)
        assert not loaded.training and loaded.fused is fuse
        assert loaded.stride.tolist() == [8.0, 16.0, 32.0] and loaded.nc == 80
        for x, expected in zip(ref["inputs"], ref["outputs"]):
            with torch.no_grad():
                assert max_rel_err(loaded(x), expected) < 1e-4


def test_saved_file_metadata_and_dtype(small_model, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    small_model.names = ["a", "b", "c"]
    save_model(small_model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if "num_batches" not in k}
    assert meta["format"] == "edgepipe.yolov5" and json.loads(meta["names"]) == ["a", "b", "c"]
    assert json.loads(meta["arch"])["width_multiple"] == 0.25 and meta["ch"] == "1" and meta["nc"] == "3"
    assert dtypes == {torch.float32}
    half = tmp_path / "h.safetensors"
    save_model(copy.deepcopy(small_model).half().fuse(), half)
    loaded = load_model(half, device="cpu", fuse=False)
    assert loaded.fused and loaded.names == ["a", "b", "c"]
    with pytest.raises(WeightsError, match="'format' is reserved"):
        save_model(small_model, tmp_path / "x.safetensors", metadata={"format": "other"})


def test_fused_file_reproduces_the_model(small_model, tmp_path):
    x = gray_batch(2, 64, 96)
    with torch.no_grad():
        expected = small_model(x)
    path = tmp_path / "fused.safetensors"
    save_model(copy.deepcopy(small_model).fuse(), path)
    loaded = load_model(path, device="cpu")
    with torch.no_grad():
        assert max_rel_err(loaded(x), expected) < 1e-4


@pytest.mark.parametrize("damage", ["truncate", "header", "garbage-length"])
def test_damaged_safetensors_refused(small_model, tmp_path, damage):
    path = tmp_path / "m.safetensors"
    save_model(small_model, path)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header":
        n = int.from_bytes(data[:8], "little")
        data = data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:]
    else:
        data = (10 ** 6).to_bytes(8, "little") + data[8:]
    path.write_bytes(data)
    with pytest.raises(WeightsError) as err:
        load_model(path, device="cpu")
    assert "damaged safetensors" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- reference checkpoints


@pytest.mark.parametrize("numpy_core, model_class, names_as_dict", [
    ("numpy._core", "Model", True),  # numpy 2, release 5.0/6.x class name, names dict
    ("numpy.core", "DetectionModel", False),  # numpy 1, release 7.0 class name, names list
])
def test_reference_checkpoint_loads_without_its_code(small_model, tmp_path, numpy_core, model_class,
                                                     names_as_dict):
    small_model.names = ["cat", "dog", "bird"]
    path = tmp_path / "best.pt"
    write_reference_checkpoint(path, small_model, numpy_core=numpy_core, model_class=model_class,
                               names_as_dict=names_as_dict)
    raw = zipfile.ZipFile(path).read(next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl")))
    for needle in (f"c{numpy_core}.multiarray\n_reconstruct", f"c{numpy_core}.multiarray\nscalar",
                   f"cmodels.yolo\n{model_class}", "cmodels.common\nC3", "ctorch.nn.modules.conv\nConv2d",
                   "c__builtin__\nset", "ccollections\nOrderedDict", "ctorch\nHalfStorage"):
        assert needle.encode() in raw, needle  # the pickle really is shaped like the trainer's

    user_models = types.ModuleType("models")  # a user's own `models` package must keep working
    user_models.marker = "mine"
    before_models = sys.modules.get("models")
    sys.modules["models"] = user_models
    try:
        modules_before = dict(sys.modules)
        model = load_model(path, device="cpu", fuse=False)
        assert dict(sys.modules) == modules_before
        assert sys.modules["models"] is user_models and not hasattr(user_models, "yolo")
    finally:
        if before_models is None:
            sys.modules.pop("models", None)
        else:
            sys.modules["models"] = before_models

    assert model.names == ["cat", "dog", "bird"] and model.nc == 3
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    x = gray_batch(2, 64, 64)
    reference = copy.deepcopy(small_model).half().float().eval()  # the values the fp16 file holds
    with torch.no_grad():
        assert max_rel_err(model(x), reference(x)) < 1e-4
        assert max_rel_err(load_model(path, device="cpu")(x), reference(x)) < 1e-4

    info = inspect_weights(path)
    assert info["source"] == "reference checkpoint" and info["checkpoint_key"] == "ema"
    assert info["class"] == f"models.yolo.{model_class}" and info["epoch"] == 41
    assert info["dtype"] == "float16" and info["layout"] == "r6" and info["size"] == "yolov5n"


def test_reference_checkpoint_plain_data_is_rebuilt(small_model, tmp_path):
    from edgepipe.yolo.unpickler import ModulePlaceholder, load_torch_archive

    path = tmp_path / "last.pt"
    write_reference_checkpoint(path, small_model)
    ckpt = load_torch_archive(str(path))
    assert isinstance(ckpt["ema"], ModulePlaceholder) and ckpt["ema"].class_path == "models.yolo.Model"
    assert ckpt["best_fitness"] == np.float64(0.4321) and isinstance(ckpt["best_fitness"], np.float64)
    assert ckpt["counts"] == 7 and ckpt["counts"].dtype == np.int64
    np.testing.assert_array_equal(ckpt["results"], np.arange(21, dtype=np.float32).reshape(3, 7))
    assert ckpt["classes_seen"] == {"cat", "dog"} and ckpt["frozen"] == frozenset({1, 2})
    assert ckpt["opt"]["hyp"] == {"lr0": 0.01} and ckpt["blob"] == b"\x00\x01bytes"
    assert ckpt["ema"].state["hyp"]["momentum"] == 0.937
    assert ckpt["ema"].state["class_weights"].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(Exception, match="not allowed"):
        type(ckpt["ema"])()  # placeholders cannot be instantiated by calling them


HOSTILE = {
    "os.system": b"cos\nsystem\n(S'touch {marker}'\ntR.",
    "posix.system": b"cposix\nsystem\n(S'touch {marker}'\ntR.",
    "builtins.eval": b"cbuiltins\neval\n(S'open(\"{marker}\", \"w\")'\ntR.",
    "builtins.exec": b"c__builtin__\nexec\n(S'open(\"{marker}\", \"w\")'\ntR.",
    "subprocess.Popen": b"csubprocess\nPopen\n((S'touch'\nS'{marker}'\nltR.",
    "torch.storage._load_from_bytes": b"ctorch.storage\n_load_from_bytes\n(C\x00tR.",
    # allowed names called in ways they may not be:
    "models.common.autopad(...)": b"cmodels.common\nautopad\n(S'touch {marker}'\ntR.",
    "torch.nn.modules.conv.Conv2d(...)": b"ctorch.nn.modules.conv\nConv2d\n(I1\nI1\nI1\ntR.",
    "_codecs.encode": b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",
    "numpy.ndarray(...)": b"cnumpy\nndarray\n((I100000\nI100000\nttR.",
    # BUILD on shared allowlist entries: a change would outlive this load
    "BUILD on torch.HalfStorage": b"ctorch\nHalfStorage\n(N}(S'dtype'\nctorch\nfloat32\nutb.",
    "BUILD on a placeholder class": b"cmodels.common\nConv\n(N}(S'forward'\nI1\nutb.",
    "numpy _reconstruct": b"cnumpy.core.multiarray\n_reconstruct\n(ccollections\nOrderedDict\n(I0\ntS'b'\ntR.",
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_hostile_pickles_refused_before_running(tmp_path, what):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    write_pickle_archive(path, HOSTILE[what].replace(b"{marker}", str(marker).encode()))
    modules_before = set(sys.modules)
    with pytest.raises(WeightsError) as err:
        load_model(path, device="cpu")
    message = str(err.value)
    assert message.startswith(f"refusing to load {path}") and "not allowed" in message and "\n" not in message
    assert not marker.exists()
    assert set(sys.modules) == modules_before
    from edgepipe.yolo.unpickler import _ALLOWED

    assert _ALLOWED[("torch", "HalfStorage")].dtype == torch.float16  # nothing was altered


def test_hostile_object_inside_a_realistic_checkpoint(small_model, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "best.pt"
    write_reference_checkpoint(path, small_model, extra={"callback": _Evil(marker)})
    with pytest.raises(WeightsError, match=r"pickle references posix\.system, which is not allowed"):
        load_model(path, device="cpu")
    assert not marker.exists()


# ----------------------------------------------------------------------------- state dicts, --gray


def test_plain_state_dict_with_cfg(small_model, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(small_model.state_dict(), path)
    x = gray_batch(1, 64, 64)
    with torch.no_grad():
        expected = small_model(x)
        for kwargs in ({"cfg": "yolov5n", "nc": 3}, {}):  # named, or recognised from the shapes
            assert max_rel_err(load_model(path, device="cpu", **kwargs)(x), expected) < 1e-4
    with pytest.raises(WeightsError, match="nc=4 was asked for but the Detect layer has 3 classes"):
        load_model(path, cfg="yolov5n", nc=4)
    with pytest.raises(WeightsError, match=r"do not fit the architecture: model\.0\.conv\.weight is \[16, 1, 6, 6\], the architecture needs \[32, 1, 6, 6\]"):
        load_model(path, cfg="yolov5s")


def _gray_equivalence(cfg: str, tmp_path: Path, as_checkpoint: bool) -> None:
    colour = randomize(build_model(cfg, ch=3, nc=2), seed=5).eval()
    src = tmp_path / "rgb.pt"
    if as_checkpoint:
        write_reference_checkpoint(src, colour)
        colour = colour.half().float()  # what the fp16 checkpoint holds
    else:
        torch.save(colour.state_dict(), src)
    with pytest.raises(WeightsError, match="has 3 input channels; edgepipe runs 1-channel models: convert it with `edgepipe weights convert --gray"):
        load_model(src, device="cpu", cfg=cfg)
    dst = tmp_path / "gray.safetensors"
    convert(src, dst, gray=True, cfg=cfg)
    gray_model = load_model(dst, device="cpu")
    assert gray_model.yaml["ch"] == 1
    g = gray_batch(2, 64, 96, seed=9)
    with torch.no_grad():
        expected = colour(g.expand(-1, 3, -1, -1))
        assert max_rel_err(gray_model(g), expected) < 1e-4
    # the sum is over colours within each Focus slice: a wrong grouping would not match
    assert expected.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 7)


def test_gray_conversion_r5_focus(tmp_path):
    _gray_equivalence("yolov5s-r5.0", tmp_path, as_checkpoint=False)


def test_gray_conversion_r6_stem_from_checkpoint(tmp_path):
    _gray_equivalence("yolov5n", tmp_path, as_checkpoint=True)


def test_convert_refuses_nonsense(small_model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(small_model, path)
    with pytest.raises(WeightsError, match="already has 1 input channel; drop --gray"):
        convert(path, tmp_path / "o.safetensors", gray=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind, expected", [
    ("missing", "not found"),
    ("empty", "is an empty file; accepted:"),
    ("dir", "is a directory; accepted:"),
    ("text", "is not a known weights format"),
    ("legacy", "legacy (pre-1.6) format"),
    ("list", "holding a list, not a YOLOv5 checkpoint"),
    ("dict", "holding a dict (keys 'a', 'b'), not a YOLOv5 checkpoint"),
    ("torchscript", "TorchScript archive"),
    ("classifier", "holds a models.yolo.ClassificationModel, not a YOLOv5 detection model"),
    ("unknown-sd", "plain state_dict of an unrecognised layout; name its config"),
])
def test_unusable_files_get_one_line_errors(small_model, tmp_path, kind, expected):
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "dir":
        path.mkdir()
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "legacy":
        torch.save({"a": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)
    elif kind == "list":
        torch.save([torch.zeros(1)], path)
    elif kind == "dict":
        torch.save({"a": 1, "b": "x"}, path)
    elif kind == "torchscript":
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    elif kind == "classifier":
        write_reference_checkpoint(path, small_model, model_class="ClassificationModel")
    elif kind == "unknown-sd":
        torch.save({"x.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError) as err:
        read_weights(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEPIPE, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_weights_info_and_convert(small_model, tmp_path):
    ckpt = tmp_path / "best.pt"
    small_model.names = ["cat", "dog", "bird"]
    write_reference_checkpoint(ckpt, small_model)
    out = run_cli("weights", "info", str(ckpt), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["layout"] == "r6" and info["size"] == "yolov5n" and info["nc"] == 3
    assert info["names"] == ["cat", "dog", "bird"] and info["source"] == "reference checkpoint"
    assert info["parameters"] == sum(p.numel() for p in small_model.parameters())
    assert info["gflops"] == round(gflops(small_model, 640), 2)  # (gflops itself: test_yolo_model)

    text = run_cli("weights", "info", str(ckpt))
    assert text.returncode == 0 and "yolov5n" in text.stdout and "GFLOPs" in text.stdout

    dst = tmp_path / "out.safetensors"
    conv = run_cli("weights", "convert", str(ckpt), str(dst))
    assert conv.returncode == 0, conv.stderr
    assert str(dst) in conv.stdout
    x = gray_batch(1, 64, 64)
    with torch.no_grad():
        expected = copy.deepcopy(small_model).half().float()(x)
        assert max_rel_err(load_model(dst, device="cpu")(x), expected) < 1e-4


def test_cli_convert_gray(tmp_path):
    colour = randomize(build_model("yolov5n", ch=3, nc=2), seed=2).eval()
    src = tmp_path / "rgb.pt"
    torch.save(colour.state_dict(), src)
    dst = tmp_path / "gray.safetensors"
    plain = run_cli("weights", "convert", str(src), str(dst))
    assert plain.returncode != 0 and "add --gray" in plain.stderr and not dst.exists()
    out = run_cli("weights", "convert", str(src), str(dst), "--gray")
    assert out.returncode == 0, out.stderr
    assert load_model(dst, device="cpu").yaml["ch"] == 1


@pytest.mark.parametrize("content, expected", [
    (None, "not found"),
    (b"garbage bytes", "is not a known weights format"),
    (HOSTILE["os.system"], "refusing to load"),
])
def test_cli_bad_files_exit_nonzero_with_one_line(tmp_path, content, expected):
    path = tmp_path / "bad.pt"
    if content == HOSTILE["os.system"]:
        write_pickle_archive(path, content.replace(b"{marker}", str(tmp_path / "ran").encode()))
    elif content is not None:
        path.write_bytes(content)
    for args in (["weights", "info", str(path)], ["weights", "convert", str(path), str(tmp_path / "o.safetensors")]):
        out = run_cli(*args)
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgepipe: error:") and expected in lines[0], out.stderr
    assert not (tmp_path / "ran").exists()


def test_device_resolution():
    from edgepipe.yolo.weights import resolve_device

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(resolve_device("auto")) == expected and str(resolve_device("cpu")) == "cpu"
    with pytest.raises(WeightsError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(WeightsError, match="device '0' requested but CUDA is not available"):
            resolve_device("0")


@pytest.mark.parametrize("key,value", [("width_multiple", 20.0), ("depth_multiple", 50.0)])
def test_hostile_architecture_metadata_is_refused_before_allocating(tmp_path, key, value):
    """A few bytes of metadata must not make the loader build a gigabyte model: refused at once
    with one line naming the bound. (nc is taken from the Detect tensors' shapes, not trusted.)"""
    import json
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import save_file

    from edgepipe.yolo import build_model
    from edgepipe.yolo.weights import save_model

    good = tmp_path / "good.safetensors"
    save_model(build_model("yolov5n", ch=1, nc=2).eval(), good)
    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    arch = json.loads(meta["arch"])
    arch[key] = value
    meta["arch"] = json.dumps(arch)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    code = (
        "import resource, sys\n"
        "from edgepipe.yolo.weights import load_model, WeightsError\n"
        "try:\n    load_model(sys.argv[1], device='cpu')\nexcept WeightsError as e:\n    print(e)\n"
        "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "out of range" in lines[0] or "larger than edgepipe accepts" in lines[0], lines
    assert int(lines[-1].split()[1]) < 1_500_000, "the loader allocated over 1.5 GB"
