"""The YOLOv5 model: parity with the reference outputs, layouts, fusion, config handling."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers.yolo import max_rel_err

from edgepipe.yolo.model import ConfigError, Detect, Model, build_model, gflops, load_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ref(ref_fixture_path):
    return torch.load(ref_fixture_path, weights_only=True)


@pytest.fixture(scope="module")
def ref_model(ref) -> Model:
    model = build_model()
    model.load_state_dict(ref["state_dict"])  # strict: every name matches, anchor_grid accepted
    return model.eval()


def test_reproduces_reference_outputs_unfused_and_fused(ref, ref_model):
    model = ref_model
    assert [tuple(x.shape) for x in ref["inputs"]] == [(1, 1, 640, 640), (2, 1, 384, 640)]
    for fused in (False, True):
        if fused:
            model.fuse()
            assert model.fused
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        for x, expected in zip(ref["inputs"], ref["outputs"]):
            with torch.no_grad():
                out = model(x)
            assert out.shape == expected.shape
            assert max_rel_err(out, expected) < 1e-4, f"fused={fused} shape={tuple(x.shape)}"


@pytest.mark.parametrize(
    "cfg, params",
    # Parameter counts the reference releases print for their 3-channel models (unfused).
    [("yolov5s-r5.0", 7276605), ("yolov5n", 1872157), ("yolov5s", 7235389), ("yolov5m", 21190557)],
)
def test_layouts_match_reference_parameter_counts(cfg, params):
    model = build_model(cfg, ch=3)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_layout_differences_between_releases():
    r5, r6 = build_model("yolov5s-r5.0"), build_model("yolov5s")
    names5, names6 = dict(r5.named_parameters()), dict(r6.named_parameters())
    assert names5["model.0.conv.conv.weight"].shape == (32, 4, 3, 3)  # Focus: 4 slices x 1 channel
    assert names6["model.0.conv.weight"].shape == (32, 1, 6, 6)  # 6x6 stride-2 stem
    assert type(r5.model[8]).__name__ == "SPP" and type(r6.model[9]).__name__ == "SPPF"
    assert len(r5.model[4].m) == 3 and len(r6.model[4].m) == 2  # 9 vs 6 repeats at depth 0.33
    assert r5.model[9].m[0].add is False and r6.model[8].m[0].add is True


def test_eval_output_decodes_boxes_in_input_pixels():
    model = build_model("yolov5n", nc=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 96))
    # 3 anchors x (8*12 + 4*6 + 2*3) cells
    assert out.shape == (2, 3 * (96 + 24 + 6), 8)
    assert (out[..., 4:] >= 0).all() and (out[..., 4:] <= 1).all()
    # Centers lie within [-0.5, 1.5] cells of their own cell; widths within 4x their anchor.
    cx, cy = out[..., 0], out[..., 1]
    assert cx.min() >= -0.5 * 32 and cx.max() <= 96 + 0.5 * 32
    assert cy.min() >= -0.5 * 32 and cy.max() <= 64 + 0.5 * 32
    assert out[..., 2].max() <= 4 * 373 and out[..., 2].min() >= 0


@pytest.mark.parametrize("shape", [(1, 1, 64, 80), (1, 3, 64, 64), (1, 64, 64)])
def test_bad_input_shape_is_explained(shape):
    model = build_model("yolov5n").eval()
    with pytest.raises(ValueError, match=r"model input must be \(B, 1, H, W\) with H and W multiples of 32"):
        model(torch.zeros(shape))


def test_train_mode_returns_raw_levels():
    model = build_model("yolov5n", nc=2)
    assert model.training
    levels = model(torch.rand(1, 1, 64, 64))
    assert [tuple(t.shape) for t in levels] == [(1, 3, 8, 8, 7), (1, 3, 4, 4, 7), (1, 3, 2, 2, 7)]
    levels[0].sum().backward()  # differentiable
    assert model.model[0].conv.weight.grad is not None


def test_detect_bias_priors():
    nc = 4
    model = build_model("yolov5n", nc=nc)
    detect = model.detect
    assert isinstance(detect, Detect)
    for conv, s in zip(detect.m, (8, 16, 32)):
        b = conv.bias.detach().view(3, -1)
        fan_in_bound = 1 / math.sqrt(conv.in_channels)  # torch's default bias init range
        obj_prior = math.log(8 / (640 / s) ** 2)
        cls_prior = math.log(0.6 / (nc - 0.99))
        assert ((b[:, 4] - obj_prior).abs() <= fan_in_bound + 1e-6).all()
        assert ((b[:, 5:] - cls_prior).abs() <= fan_in_bound + 1e-6).all()
        assert (b[:, :4].abs() <= fan_in_bound + 1e-6).all()


def test_anchors_are_stored_in_grid_units():
    model = build_model()
    sd = model.state_dict()
    anchors = sd["model.24.anchors"]
    assert anchors.shape == (3, 3, 2)
    pixels = anchors * model.stride.view(-1, 1, 1)
    assert pixels.flatten().tolist() == [10, 13, 16, 30, 33, 23, 30, 61, 62, 45, 59, 119,
                                         116, 90, 156, 198, 373, 326]
    assert "model.24.anchor_grid" not in sd


def test_fused_model_has_conv_bias_names():
    model = build_model("yolov5n").eval().fuse()
    names = set(model.state_dict())
    assert "model.0.conv.bias" in names and "model.0.bn.weight" not in names
    assert model.fuse() is model  # idempotent


def test_reference_style_config_dict():
    # The `yaml` dict inside a reference checkpoint: Python spellings as strings, learned anchors.
    d = load_config("yolov5n")
    d["head"] = [[f, n, m, ["None" if a is None else a for a in args]] for f, n, m, args in d["head"]]
    d["anchors"] = 3
    d["names"] = {0: "a", 1: "b"}
    model = build_model(d, nc=2)
    assert model.names == ["a", "b"] and model.nc == 2
    assert model.yaml["ch"] == 1 and model.yaml["nc"] == 2
    assert "scales" not in build_model("yolov5n").yaml
    assert build_model("yolov5n").names[:2] == ["class0", "class1"]


def test_activation_from_config_is_parsed_not_evaluated():
    d = load_config("yolov5n")
    d["activation"] = "nn.LeakyReLU(0.1)"
    model = build_model(d)
    assert isinstance(model.model[0].act, torch.nn.LeakyReLU)
    d["activation"] = "__import__('os').system('true')"
    with pytest.raises(ValueError, match="unsupported activation"):
        build_model(d)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["backbone"].__setitem__(1, [-1, 1, "Evil", [1]]), "layer 1: unknown module 'Evil'"),
        (lambda d: d["backbone"].__setitem__(1, [-1, 1, "Conv"]), r"layer 1: expected \[from"),
        (lambda d: d["head"].__setitem__(2, [[-1, 40], 1, "Concat", [1]]), "layer 12: 'from'"),
        (lambda d: d.pop("anchors"), "no 'anchors' key"),
        (lambda d: d["head"].pop(), "last layer must be Detect"),
    ],
)
def test_bad_configs_name_the_fault(mutate, message):
    d = load_config("yolov5n")
    mutate(d)
    with pytest.raises(ConfigError, match=message):
        build_model(d)


def test_unknown_config_name_or_size(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a shipped name"):
        build_model("yolov5q")
    cfg = tmp_path / "sizes.yaml"
    d = load_config("yolov5n")

    d.pop("depth_multiple"), d.pop("width_multiple")
    d["scales"] = {"n": [0.33, 0.25]}
    cfg.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="say which with a 'scale' key"):
        build_model(str(cfg))
    d["scale"] = "n"
    cfg.write_text(yaml.safe_dump(d))
    # yolov5n's published 1872157 less the stem's 2 x 16 x 6 x 6 weights of the two dropped colors
    assert sum(p.numel() for p in build_model(cfg).parameters()) == 1872157 - 2 * 16 * 36


@pytest.mark.parametrize("cfg, published", [("yolov5s-r5.0", 17.0), ("yolov5n", 4.5), ("yolov5s", 16.5)])
def test_gflops_match_published_figures(cfg, published):
    # The releases print GFLOPs at 640 for 3-channel input (counted by a profiler that also
    # counts a few non-convolution operations; hence 1.5%).
    model = build_model(cfg, ch=3)
    assert abs(gflops(model, 640) - published) / published < 0.015
    assert abs(gflops(model, (320, 640)) - gflops(model, 640) / 2) < 1e-9  # linear in pixels
    assert gflops(build_model(cfg, ch=1), 640) < gflops(model, 640)
