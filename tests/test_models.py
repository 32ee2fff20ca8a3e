"""Tests of the model zoo (sliver.models): registry, sizes, tracing, ONNX export, checkpoint layout.

Full-size models are built once per module (lazily, by the ``zoo`` fixture); ONNX export is
checked on the tiny models and on deit_tiny. The checkpoint-compatibility tests use small
reference implementations written below with timm's VisionTransformer and torchvision's ResNet
module structure (no timm/torchvision needed).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sliver import models
from sliver.ir.errors import ModelInputError, SliverError, UnknownModelError
from sliver.models import Attention, Block
from timm_style import RefTimmViT

FULL = ["deit_tiny", "deit_small", "deit_base", "resnet18", "resnet50", "mobilenet_v2", "vgg16", "segmenter_tiny"]
TINY = ["tiny_deit", "tiny_resnet", "tiny_mobilenet_v2", "tiny_vgg", "tiny_segmenter"]
ALL = FULL + TINY
VITS = {"deit_tiny", "deit_small", "deit_base", "segmenter_tiny", "tiny_deit", "tiny_segmenter"}

# Reference parameter counts (timm / torchvision / the brief); measured counts must be within 0.5%.
EXPECTED_PARAMS = {
    "deit_tiny": 5.72e6, "deit_small": 22.05e6, "deit_base": 86.57e6,
    "resnet18": 11.69e6, "resnet50": 25.56e6, "mobilenet_v2": 3.50e6, "vgg16": 138.36e6,
    "segmenter_tiny": 5.71e6,  # ViT-Ti/16 encoder with a 1025-token pos_embed + Linear(192, 150)
}
# Exact counts of the models as built today (a change here is a change of architecture).
EXACT_PARAMS = {
    "deit_tiny": 5_717_416, "deit_small": 22_050_664, "deit_base": 86_567_656,
    "resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872, "vgg16": 138_357_544,
    "segmenter_tiny": 5_712_342,
    "tiny_deit": 409_802, "tiny_resnet": 308_826, "tiny_mobilenet_v2": 281_962, "tiny_vgg": 131_754,
    "tiny_segmenter": 218_251,
}
INPUT_SHAPES = {name: (1, 3, 224, 224) for name in FULL}
INPUT_SHAPES.update({"segmenter_tiny": (1, 3, 512, 512), "tiny_segmenter": (1, 3, 64, 64)})
INPUT_SHAPES.update({name: (1, 3, 32, 32) for name in TINY if name != "tiny_segmenter"})
OUTPUT_SHAPES = {name: (1, 1000) for name in FULL}
OUTPUT_SHAPES.update({name: (1, 10) for name in TINY})
OUTPUT_SHAPES.update({"segmenter_tiny": (1, 150, 512, 512), "tiny_segmenter": (1, 11, 64, 64)})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module single-threaded: on a shared 2-core machine, OpenMP barriers between two
    threads stall on every small op when another process holds a core (tiny models went from
    milliseconds to seconds); one thread keeps the timings stable. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zoo():
    """name -> (model, input, eager output), each built once per module under seed 0."""
    cache: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model = models.create(name)
            x = torch.randn(models.input_shape(name))
            with torch.no_grad():
                y = model(x)
            cache[name] = (model, x, y)
        return cache[name]

    yield get
    cache.clear()


class LeafTracer(torch.fx.Tracer):
    """Keeps the given module classes (e.g. Block and Attention) as single call_module nodes."""

    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


# -- registry --------------------------------------------------------------------------------
def test_available_lists_every_model_with_its_input_shape():
    listing = models.available()
    assert list(listing) == ALL
    for name, text in listing.items():
        assert "\n" not in text and text.strip() == text
        assert "x".join(map(str, INPUT_SHAPES[name])) in text, (name, text)
        assert models.input_shape(name) == INPUT_SHAPES[name]


def test_unknown_name_raises_typed_error_listing_names():
    with pytest.raises(UnknownModelError) as info:
        models.create("nope")
    message = str(info.value)
    assert isinstance(info.value, SliverError) and "\n" not in message
    assert "'nope'" in message
    for name in ALL:
        assert name in message
    with pytest.raises(UnknownModelError, match="did you mean 'resnet18'"):
        models.input_shape("resnet19")


def test_unknown_option_raises_typed_error_naming_it():
    with pytest.raises(UnknownModelError) as info:
        models.create("tiny_resnet", depth=3)
    message = str(info.value)
    assert "'depth'" in message and "tiny_resnet" in message
    assert "layers" in message and "stem_stride" in message  # lists the valid options
    with pytest.raises(UnknownModelError, match="'bogus'"):
        models.input_shape("tiny_deit", bogus=1)


@pytest.mark.parametrize("name, options", [
    ("tiny_deit", {"num_heads": 5}),             # 64 is not divisible by 5
    ("tiny_deit", {"img_size": 30}),             # not a multiple of the patch size
    ("tiny_resnet", {"block": "wide"}),
    ("tiny_resnet", {"layers": (1, 1)}),
    ("tiny_vgg", {"cfg": (16, "X")}),
    ("tiny_mobilenet_v2", {"width_mult": "big"}),
    ("tiny_segmenter", {"img_size": -8}),
])
def test_bad_option_values_raise_typed_errors(name, options):
    with pytest.raises(ModelInputError) as info:
        models.create(name, **options)
    assert "\n" not in str(info.value)


def test_options_override_defaults():
    model = models.create("tiny_deit", num_classes=3, depth=2)
    assert len(model.blocks) == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)

    shape = models.input_shape("tiny_segmenter", img_size=32)
    assert shape == (1, 3, 32, 32)
    seg = models.create("tiny_segmenter", img_size=32, num_classes=4)
    assert seg(torch.randn(shape)).shape == (1, 4, 32, 32)

    shape = models.input_shape("tiny_resnet", in_chans=1, batch_size=4, img_size=28)
    assert shape == (4, 1, 28, 28)
    assert models.create("tiny_resnet", in_chans=1, num_classes=7)(torch.randn(shape)).shape == (4, 7)

    assert models.input_shape("segmenter_tiny", img_size=(256, 512)) == (1, 3, 256, 512)


@pytest.mark.parametrize("name", TINY)
def test_create_is_deterministic_and_in_eval_mode(name):
    torch.manual_seed(123)
    a = models.create(name)
    torch.manual_seed(123)
    b = models.create(name)
    assert not any(m.training for m in a.modules())
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- sizes and outputs -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_param_count_and_output_shape(zoo, name):
    model, x, y = zoo(name)
    count = n_params(model)
    assert count == EXACT_PARAMS[name]
    if name in EXPECTED_PARAMS:
        assert abs(count - EXPECTED_PARAMS[name]) <= 0.005 * EXPECTED_PARAMS[name]
    else:
        assert count < 1_000_000
    assert f"{count / 1e6:.2f}M params" in models.available()[name]  # the description is honest
    assert tuple(x.shape) == INPUT_SHAPES[name]
    assert tuple(y.shape) == OUTPUT_SHAPES[name]
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_cheap(zoo, name):
    """A FLOP budget instead of a wall-clock one (timings flake on a shared 2-core machine)."""
    model, x, _ = zoo(name)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert 1e6 < counter.get_total_flops() < 100e6  # a few milliseconds on one CPU core


# -- torch.fx --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_fx_symbolic_trace(zoo, name):
    model, x, y = zoo(name)
    gm = torch.fx.symbolic_trace(model)
    ops = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert F.scaled_dot_product_attention not in ops
    if name in TINY or name in ("resnet18", "mobilenet_v2", "deit_tiny"):
        with torch.no_grad():
            torch.testing.assert_close(gm(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_fx_trace_with_block_and_attention_as_leaves(zoo, name):
    model, x, y = zoo(name)
    for leaves in ((Block, Attention), (Attention,)):
        graph = LeafTracer(leaves).trace(model)
        gm = torch.fx.GraphModule(model, graph)
        called = {n.target for n in graph.nodes if n.op == "call_module"}
        if name in VITS:
            depth = len(model.blocks)
            if Block in leaves:
                assert {f"blocks.{i}" for i in range(depth)} <= called
                assert not any(".attn" in t for t in called)
            else:
                assert {f"blocks.{i}.attn" for i in range(depth)} <= called
                assert not any(t.endswith(".attn.qkv") for t in called)
        if name in TINY:
            with torch.no_grad():
                torch.testing.assert_close(gm(x), y, rtol=0, atol=0)


def test_attention_is_explicit_and_stateless(zoo):
    model, x, _ = zoo("tiny_deit")
    attn = model.blocks[0].attn
    assert type(attn).__name__ == "Attention" and type(model.blocks[0]).__name__ == "Block"
    assert type(model.blocks[0].mlp).__name__ == "Mlp"
    assert (attn.num_heads, attn.head_dim) == (4, 16) and attn.scale == pytest.approx(16 ** -0.5)
    gm = torch.fx.symbolic_trace(attn)
    targets = [n.target for n in gm.graph.nodes]
    assert "softmax" in targets and (torch.matmul in targets or "matmul" in targets
                                     or any(getattr(t, "__name__", "") == "matmul" for t in targets))
    tokens = torch.randn(2, 65, 64)
    before = dict(vars(attn))
    with torch.no_grad():
        out = attn(tokens)
    assert dict(vars(attn)).keys() == before.keys()
    assert all(vars(attn)[k] is v for k, v in before.items() if not k.startswith("_"))
    # Against a direct formula.
    with torch.no_grad():
        q, k, v = attn.qkv(tokens).reshape(2, 65, 3, 4, 16).permute(2, 0, 3, 1, 4)
        ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        ref = attn.proj(ref.transpose(1, 2).reshape(2, 65, 64))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# -- ONNX ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY + ["deit_tiny"])
def test_onnx_export(zoo, name):
    model, x, y = zoo(name)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, y.numpy(), rtol=1e-4, atol=1e-4)


# -- layouts ---------------------------------------------------------------------------------
def test_vit_layout(zoo):
    model, _, _ = zoo("deit_small")
    assert model.patch_embed.proj.kernel_size == (16, 16) and model.patch_embed.proj.stride == (16, 16)
    assert model.cls_token.shape == (1, 1, 384) and model.pos_embed.shape == (1, 197, 384)
    assert len(model.blocks) == 12
    block = model.blocks[11]
    assert block.norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert block.attn.qkv.in_features == 384 and block.attn.qkv.out_features == 1152
    assert block.attn.qkv.bias is not None and block.attn.num_heads == 6
    assert isinstance(block.mlp.act, nn.GELU) and block.mlp.fc1.out_features == 1536
    assert model.head.out_features == 1000
    assert not [m for m in model.modules() if isinstance(m, nn.Dropout)]


def test_segmenter_layout_and_decoder(zoo):
    model, x, y = zoo("tiny_segmenter")
    keys = set(model.state_dict())
    assert {"patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.5.attn.qkv.weight", "norm.weight",
            "decoder.head.weight", "decoder.head.bias"} <= keys
    assert "head.weight" not in keys
    assert model.pos_embed.shape == (1, 65, 64) and len(model.blocks) == 6
    assert isinstance(model.blocks[0], Block)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model.decoder.head(tokens[:, 1:])  # CLS dropped
        grid = logits.transpose(1, 2).reshape(1, 11, 8, 8)
        ref = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    full, _, _ = zoo("segmenter_tiny")
    assert full.pos_embed.shape == (1, 1025, 192) and full.decoder.head.out_features == 150


MOBILENET_V2_KEYS = {  # torchvision mobilenet_v2 key -> shape (a representative subset)
    "features.0.0.weight": (32, 3, 3, 3),
    "features.0.1.running_var": (32,),
    "features.1.conv.0.0.weight": (32, 1, 3, 3),
    "features.1.conv.0.1.bias": (32,),
    "features.1.conv.1.weight": (16, 32, 1, 1),
    "features.1.conv.2.running_mean": (16,),
    "features.2.conv.0.0.weight": (96, 16, 1, 1),
    "features.2.conv.1.0.weight": (96, 1, 3, 3),
    "features.2.conv.1.1.running_mean": (96,),
    "features.2.conv.2.weight": (24, 96, 1, 1),
    "features.2.conv.3.num_batches_tracked": (),
    "features.17.conv.2.weight": (320, 960, 1, 1),
    "features.18.0.weight": (1280, 320, 1, 1),
    "features.18.1.weight": (1280,),
    "classifier.1.weight": (1000, 1280),
    "classifier.1.bias": (1000,),
}


def test_mobilenet_v2_torchvision_keys(zoo):
    model, _, _ = zoo("mobilenet_v2")
    sd = model.state_dict()
    assert len(sd) == 314  # torchvision's mobilenet_v2 state_dict has 314 entries
    for key, shape in MOBILENET_V2_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert isinstance(model.features[0], nn.Sequential)
    assert [type(m) for m in model.features[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.2
    residual = [b for b in model.features[1:18] if b.use_res_connect]
    assert len(residual) == 10  # repeated blocks of each stage, where stride 1 and in == out


def test_tiny_mobilenet_keeps_a_spatial_map(zoo):
    model, x, _ = zoo("tiny_mobilenet_v2")
    with torch.no_grad():
        feats = model.features(x)
    assert min(feats.shape[-2:]) >= 2
    assert len(model.features) == 19 and "features.1.conv.0.0.weight" in model.state_dict()


def test_resnet_and_vgg_torchvision_keys(zoo):
    r50 = zoo("resnet50")[0].state_dict()
    assert len(r50) == 320
    for key, shape in {"conv1.weight": (64, 3, 7, 7), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                       "layer1.0.downsample.1.running_var": (256,), "layer2.0.conv2.weight": (128, 128, 3, 3),
                       "layer4.2.bn3.weight": (2048,), "fc.weight": (1000, 2048)}.items():
        assert tuple(r50[key].shape) == shape, key
    assert len(zoo("resnet18")[0].state_dict()) == 122
    vgg, _, _ = zoo("vgg16")
    convs = [i for i, m in enumerate(vgg.features) if isinstance(m, nn.Conv2d)]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert [i for i, m in enumerate(vgg.features) if isinstance(m, nn.MaxPool2d)] == [4, 9, 16, 23, 30]
    assert len(vgg.features) == 31
    assert [type(m) for m in vgg.classifier] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU,
                                                 nn.Dropout, nn.Linear]
    assert vgg.classifier[0].in_features == 25088 and vgg.avgpool.output_size == (7, 7)
    assert len(vgg.state_dict()) == 32
    tiny = zoo("tiny_vgg")[0]
    assert isinstance(tiny.classifier[6], nn.Linear) and tiny.avgpool.output_size == (1, 1)


# -- checkpoint compatibility against reference structures -----------------------------------
class RefBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # shared, as torchvision does
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class RefTorchvisionResNet18(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(RefBasicBlock(cin, w, stride), RefBasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_timm_deit_small_checkpoint_loads_strictly():
    torch.manual_seed(1)
    ref = RefTimmViT(dim=384, depth=12, heads=6).eval()
    ours = models.create("deit_small")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_torchvision_resnet18_checkpoint_loads_strictly():
    torch.manual_seed(2)
    ref = RefTorchvisionResNet18()
    for m in ref.modules():  # non-trivial BN statistics, so a mix-up would show
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    ref.eval()
    ours = models.create("resnet18")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
