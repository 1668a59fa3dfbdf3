"""sbfast.models: shapes, parameter counts, determinism, gradients, the factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sbfast.models import MODEL_NAMES, ResNet18, TinyViT, WideResNet, count_parameters, create_model

# (name, kwargs, input shape): tiny widths keep every case well under a second on 2 cores.
CASES = [
    ("resnet18", {"width": 4}, (3, 3, 32, 32)),
    ("resnet18", {"width": 4, "in_channels": 1}, (3, 1, 8, 8)),
    ("resnet18_imagenet", {"width": 4}, (3, 3, 64, 64)),
    ("resnet18_imagenet", {"width": 4}, (3, 3, 32, 32)),
    ("resnet18_tiny", {"width": 4}, (3, 3, 64, 64)),
    ("resnet18_tiny", {"width": 4, "in_channels": 1}, (3, 1, 8, 8)),
    ("wrn40_2", {}, (2, 3, 8, 8)),
    ("cnn", {}, (3, 1, 8, 8)),
    ("cnn", {"in_channels": 3, "width": 4}, (3, 3, 32, 32)),
    ("mlp", {}, (3, 1, 8, 8)),
    ("mlp", {"in_channels": 3, "image_size": 32, "hidden": 16}, (3, 3, 32, 32)),
    ("vit_tiny", {"in_channels": 1, "image_size": 8, "patch_size": 2, "dim": 16}, (3, 1, 8, 8)),
    ("vit_tiny", {"dim": 16, "pool": "mean"}, (3, 3, 32, 32)),
]


@pytest.mark.parametrize("name,kw,shape", CASES)
def test_forward_backward_shapes(name, kw, shape):
    torch.manual_seed(0)
    model = create_model(name, 7, **kw)
    x = torch.randn(*shape)
    out = model(x)
    assert out.shape == (shape[0], 7) and out.dtype == torch.float32
    nn.functional.cross_entropy(out, torch.arange(shape[0]) % 7).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_every_name_is_tested():
    assert {c[0] for c in CASES} == set(MODEL_NAMES)


def test_resnet18_param_count_matches_the_paper():
    # The release's CIFAR ResNet18 at width 64: 11,173,962 parameters for 10 classes.
    assert count_parameters(create_model("resnet18", 10)) == 11_173_962
    assert count_parameters(create_model("resnet18", 100)) == 11_173_962 + 512 * 90 + 90
    # The ImageNet stem differs only in its first conv: 7x7 instead of 3x3 (3 -> 64 channels).
    assert count_parameters(create_model("resnet18_imagenet", 10)) == 11_173_962 + 64 * 3 * (49 - 9)


def _wrn_count(depth: int, k: int, classes: int) -> int:
    # Closed form of the pre-activation WRN, counted by hand: stem conv, per block BN (2 params per
    # channel) + 3x3 convs + a 1x1 shortcut conv when the width changes, final BN, Linear.
    n = (depth - 4) // 6
    ch = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 16 * 9
    for s in range(3):
        cin, cout = ch[s], ch[s + 1]
        for i in range(n):
            c_in = cin if i == 0 else cout
            total += 2 * c_in + c_in * cout * 9 + 2 * cout + cout * cout * 9
            total += c_in * cout if c_in != cout else 0
    return total + 2 * ch[3] + ch[3] * classes + classes


def test_wrn40_2_param_count():
    assert count_parameters(create_model("wrn40_2", 10)) == _wrn_count(40, 2, 10) == 2_243_546


def test_state_dict_names_follow_the_release():
    # So checkpoints of the authors' models/resnet_width.py and models/wideResnet.py load.
    keys = set(ResNet18(10, width=2).state_dict())
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "layer2.0.shortcut.0.weight",
        "layer4.1.bn2.bias",
        "linear.weight",
    } <= keys
    keys = set(WideResNet(16, 2).state_dict())
    assert {
        "conv1.weight",
        "block1.layer.0.convShortcut.weight",
        "block3.layer.1.bn2.weight",
        "bn1.weight",
        "fc.bias",
    } <= keys


def test_determinism_under_manual_seed():
    for name, kw, shape in CASES[:1] + CASES[5:6] + CASES[9:10]:
        torch.manual_seed(123)
        a = create_model(name, 5, **kw)
        torch.manual_seed(123)
        b = create_model(name, 5, **kw)
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
        x = torch.randn(*shape)
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_vit_linears_see_3d_inputs_and_has_every_layer_type():
    model = create_model("vit_tiny", 10, in_channels=1, image_size=8, patch_size=2, dim=16, heads=2)
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].dim()))
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not model.head
    ]
    model(torch.randn(2, 1, 8, 8))
    for h in hooks:
        h.remove()
    assert seen and all(d == 3 for d in seen)
    kinds = {type(m) for m in model.modules()}
    assert {nn.Conv2d, nn.Linear, nn.LayerNorm} <= kinds and nn.MultiheadAttention not in kinds
    names = {n for n, _ in model.named_parameters()}
    assert {"cls_token", "pos_embed"} <= names
    assert TinyViT(pool="mean").cls_token is None


def test_per_sample_gradients_with_torch_func():
    # The reference scores use functional_call + vmap(grad) in eval mode; every model must allow it.
    from torch.func import functional_call, grad, vmap

    for name, kw in (
        ("cnn", {"width": 4}),
        ("vit_tiny", {"in_channels": 1, "image_size": 8, "patch_size": 2, "dim": 8, "heads": 2}),
    ):
        model = create_model(name, 3, **kw).eval()
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, x, y, model=model, buffers=buffers):
            out = functional_call(model, (p, buffers), (x[None],))
            return nn.functional.cross_entropy(out, y[None])

        x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        # The mean of per-sample gradients is the batch gradient.
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for k, p in model.named_parameters():
            assert torch.allclose(per[k].mean(0), p.grad, atol=1e-5), (name, k)


def test_factory_errors():
    with pytest.raises(ValueError, match="resnet18.*vit_tiny"):
        create_model("resnet50", 10)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cnn", 0)
    with pytest.raises(TypeError):
        create_model("cnn", 10, depth=3)
    with pytest.raises(ValueError, match="divide"):
        create_model("vit_tiny", 10, image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth=12)
    with pytest.raises(ValueError, match="built for"):
        create_model("vit_tiny", 10, dim=8)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="input features"):
        create_model("mlp", 10)(torch.randn(1, 3, 8, 8))


def test_count_parameters_trainable_only():
    model = create_model("mlp", 10, hidden=4, depth=1)
    total = count_parameters(model)
    assert total == 64 * 4 + 4 + 4 * 10 + 10
    model.net[0].weight.requires_grad_(False)
    assert count_parameters(model) == total - 256 and count_parameters(model, trainable_only=False) == total


def _tiny_count(classes: int, w: int = 64) -> int:
    # By hand: stem 3x3 conv + BN; per stage two blocks of two 3x3 convs + two BNs, the first
    # block of stages 2-4 with a 1x1 conv + BN shortcut, every other block a per-channel scale
    # (C weights); fc.
    total = 3 * w * 9 + 2 * w
    cin = w
    for s, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
        for b in range(2):
            c_in = cin if b == 0 else c
            total += c_in * c * 9 + 2 * c + c * c * 9 + 2 * c
            total += c_in * c + 2 * c if (b == 0 and s > 0) else c
        cin = c
    return total + 8 * w * classes + classes


def test_the_release_tiny_imagenet_resnet18():
    """models/resnet_imgnet.py's resnet18: its parameter count for 200 classes, its state_dict
    names, identity shortcuts that scale each channel by a learnable weight starting at 1, the
    CIFAR stem (64x64 in, 8x8 after the last stage) and He-initialised convolutions."""
    model = create_model("resnet18_tiny", 200)
    assert count_parameters(model) == _tiny_count(200) == 11_272_456
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.0.weight", "conv1.1.weight"]
    assert "conv2_x.0.residual_function.3.weight" in keys and "conv3_x.0.shortcut.0.weight" in keys
    assert "conv2_x.0.shortcut.weight" in keys and keys[-2:] == ["fc.weight", "fc.bias"]
    small = create_model("resnet18_tiny", 5, width=4).eval()
    scale = small.conv3_x[1].shortcut
    assert torch.equal(scale.weight, torch.ones(8, 1, 1, 1))
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(scale(x), x)
    with torch.no_grad():
        scale.weight.copy_(torch.arange(1.0, 9.0).view(8, 1, 1, 1))
    torch.testing.assert_close(scale(x), x * torch.arange(1.0, 9.0).view(1, 8, 1, 1))
    feats = {}
    small.conv5_x.register_forward_hook(lambda m, i, o: feats.update(out=o.shape))
    small(torch.randn(2, 3, 64, 64))
    assert feats["out"] == (2, 32, 8, 8)  # strides 1, 1, 2, 2, 2: no stem down-sampling
    torch.manual_seed(0)
    w = create_model("resnet18_tiny", 10).conv4_x[0].residual_function[0].weight
    assert abs(w.std().item() - (2 / (256 * 9)) ** 0.5) < 0.002  # He, fan_out = 256 x 3 x 3


def test_the_tiny_imagenet_model_loads_a_release_state_dict():
    """The release's state_dict layout: every conv / linear / BN with ``*_mask`` buffers that its
    forward multiplies into the weights, shortcut scales of shape [C, 1, 1]. Loading it folds
    the masks in: the forward equals the masked weights' forward."""
    torch.manual_seed(0)
    src = create_model("resnet18_tiny", 6, width=4).eval()
    with torch.no_grad():
        src.conv2_x[0].shortcut.weight.uniform_(0.5, 1.5)
    release = {}
    for k, v in src.state_dict().items():
        if k.endswith("shortcut.weight") and v.dim() == 4 and v.shape[1:] == (1, 1, 1):
            v = v.reshape(-1, 1, 1)
        release[k] = v
        if k.endswith(".weight") and "running" not in k:
            release[k[: -len("weight")] + "weight_mask"] = torch.ones_like(v)
    mask = (torch.rand_like(release["conv3_x.0.residual_function.0.weight"]) < 0.7).float()
    release["conv3_x.0.residual_function.0.weight_mask"] = mask
    dst = create_model("resnet18_tiny", 6, width=4).eval()
    dst.load_state_dict(release)
    with torch.no_grad():
        src.conv3_x[0].residual_function[0].weight.mul_(mask)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(dst(x), src(x))
    assert dst.conv2_x[0].shortcut.weight.shape == (4, 1, 1, 1)
