"""Models for the experiments, and one of each layer type the per-sample scores must handle.

* ``resnet18``: the release's CIFAR ResNet18 (models/resnet_width.py): BasicBlock [2, 2, 2, 2],
  3x3 stride-1 stem, no max-pool, widths w, 2w, 4w, 8w; width 64 is the paper's model (11,173,962
  parameters for 10 classes). Attribute names follow the release, so its state_dicts load.
* ``resnet18_imagenet``: the same body with the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2
  max-pool) for 64x64 inputs. Note: the release's Tiny-ImageNet model (models/resnet_imgnet.py)
  in fact keeps a 3x3 stride-1 stem without max-pool, i.e. ``resnet18`` at width 64 on 64x64.
* ``resnet18_tiny``: the release's Tiny-ImageNet ResNet18 as it is (models/resnet_imgnet.py):
  the CIFAR stem, widths 64-512, identity shortcuts with a learnable per-channel scale, He
  initialisation; the preset model of ``tiny_imagenet`` and ``folder``.
* ``wrn40_2``: pre-activation Wide ResNet, depth 40, widen factor 2, dropout 0 (the release's
  models/wideResnet.py, names and initialisation alike).
* ``cnn``, ``mlp``: small models sized for the 8x8 digits (in_channels=1 by default).
* ``vit_tiny``: a small Vision Transformer whose every Linear sees 3-D [B, T, D] inputs
  (attention written with nn.Linear, not nn.MultiheadAttention), with LayerNorm and learned
  embeddings (positional, class token).

All models map float32 [B, in_channels, H, W] to logits [B, num_classes]; they pool adaptively,
so the convolutional ones run on 8x8 and 32x32 (and 64x64) inputs alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# ResNet18 (CIFAR stem) and its ImageNet-stem variant
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is a 1x1 strided conv + BN when the shape changes, else the identity (an empty
    nn.Sequential, as in the release, so parameter names match).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 with a CIFAR stem (``stem="cifar"``: 3x3 conv stride 1, no max-pool) or an
    ImageNet stem (``stem="imagenet"``: 7x7 conv stride 2 padding 3 + 3x3 max-pool stride 2).

    Args:
        num_classes: output logits. width: channels of the first stage (w, 2w, 4w, 8w; 64 = the
            paper's). in_channels: input channels. stem: "cifar" or "imagenet".
    Shapes:
        x [B, in_channels, H, W] float -> logits [B, num_classes]. The release pools with a fixed
        4x4 average (exactly global pooling on 32x32 inputs); this uses adaptive global average
        pooling, identical there and valid for other sizes (8x8 digits, 64x64).
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3, stem: str = "cifar") -> None:
        super().__init__()
        _check_pos("num_classes", num_classes)
        _check_pos("width", width)
        _check_pos("in_channels", in_channels)
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.in_planes = width
        self.layer1 = self._make_layer(width, 2, 1)
        self.layer2 = self._make_layer(2 * width, 2, 2)
        self.layer3 = self._make_layer(4 * width, 2, 2)
        self.layer4 = self._make_layer(8 * width, 2, 2)
        self.linear = nn.Linear(8 * width, num_classes)
        if stem == "imagenet":
            # He init (fan_out) as torchvision and the release's ImageNet-style ResNet; the CIFAR
            # model keeps PyTorch's default init, as the release does.
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --------------------------------------------------------------------------------------------
# WRN-40-2 (pre-activation)
# --------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: conv2(dropout(relu(bn2(conv1(relu(bn1(x))))))) + shortcut.

    When the shape changes the shortcut is a 1x1 conv applied to relu(bn1(x)) (the activated
    input, as in the original WRN code); otherwise it is x itself.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide ResNet (Zagoruyko & Komodakis), pre-activation, depth = 6n + 4.

    Args:
        depth: 6n + 4 (40 -> n = 6 blocks per stage). widen_factor: k (stage widths 16k, 32k,
            64k after a 16-channel stem). drop_rate: dropout inside blocks (0 in the paper).
    Shapes:
        x [B, in_channels, H, W] -> logits [B, num_classes]; strides 1, 2, 2 then global pooling.
    Init (as the release): conv weights N(0, 2 / (k*k*out_channels)), BN weight 1 bias 0,
    Linear bias 0 (weight: PyTorch default).
    """

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 2,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth!r}")
        _check_pos("widen_factor", widen_factor)
        _check_pos("num_classes", num_classes)
        _check_pos("in_channels", in_channels)
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = _NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = _NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------------------------
# Small models for the 8x8 digits
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three 3x3 conv + BatchNorm + ReLU layers (one 2x2 max-pool), global pooling, Linear.

    Args:
        num_classes, in_channels (1 for digits), width: channels of the first conv (then 2w, 2w).
    Shapes: [B, in_channels, H, W] (H, W >= 2) -> [B, num_classes].
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        _check_pos("num_classes", num_classes)
        _check_pos("in_channels", in_channels)
        _check_pos("width", width)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden Linear + ReLU layers, then a Linear head.

    Args:
        num_classes, in_channels (1 for digits), image_size: H = W of the input (8 for digits),
        hidden: hidden width, depth: number of hidden layers (>= 1).
    Shapes: [B, in_channels, image_size, image_size] -> [B, num_classes].
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: int = 128, depth: int = 2
    ) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
            _check_pos(name, v)
        _check_pos("hidden", hidden)
        _check_pos("depth", depth)
        self.in_features = in_channels * image_size * image_size
        layers: list[nn.Module] = []
        d = self.in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features per sample, got {x.shape[1]}")
        return self.net(x)


# --------------------------------------------------------------------------------------------
# Tiny ViT
# --------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit nn.Linear projections on [B, T, D] inputs.

    softmax(Q K^T / sqrt(D / heads)) V per head, then an output projection. Written out (no
    nn.MultiheadAttention, no fused SDPA) so that per-sample gradient code sees ordinary 3-D
    Linear layers and plain matmuls.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, heads, T, D/heads]
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU; all on [B, T, D]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A small Vision Transformer.

    Args:
        num_classes, in_channels.
        image_size: H = W of the inputs (fixes the number of positional embeddings).
        patch_size: must divide image_size (T = (image_size / patch_size)^2 tokens).
        dim, depth, heads, mlp_ratio: transformer sizes.
        pool: "cls" (a learned class token, its final state feeds the head) or "mean" (mean over
            the patch tokens).
    Shapes:
        x [B, in_channels, image_size, image_size] -> Conv2d patch embedding [B, T, dim]
        (+ class token, + positional embedding) -> blocks -> LayerNorm -> head [B, num_classes].
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
            _check_pos(name, v)
        for name, v in (("patch_size", patch_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            _check_pos(name, v)
        if image_size % patch_size:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.image_size, self.pool = image_size, pool
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + (pool == "cls"), dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"TinyViT built for {self.image_size}x{self.image_size} inputs, got {tuple(x.shape)}")
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, T, dim]
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = self.norm(self.blocks(t + self.pos_embed))
        feat = t[:, 0] if self.pool == "cls" else t.mean(dim=1)
        return self.head(feat)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def _check_pos(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")


class ScaledIdentity(nn.Conv2d):
    """x * w[c] with w [C, 1, 1, 1] initialised to 1: the release's ``layers.Identity2d`` shortcut
    (a learnable per-channel scale), written as a depthwise 1x1 convolution so that the
    per-sample scores treat it as the convolution it is (their grouped-conv rule)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 1, groups=channels, bias=False)

    def reset_parameters(self) -> None:
        # ones, drawing nothing from the RNG (as Identity2d): a seeded model is the release's, bit for bit
        nn.init.ones_(self.weight)


class TinyBasicBlock(nn.Module):
    """The release's Tiny-ImageNet BasicBlock: relu(residual_function(x) + shortcut(x)) with
    residual_function = conv3x3-BN-ReLU-conv3x3-BN and shortcut = 1x1 strided conv + BN when the
    shape changes, else the per-channel scale (attribute names as the release's)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, padding=1, bias=False),
            nn.BatchNorm2d(planes),
        )
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = ScaledIdentity(in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_function(x) + self.shortcut(x))


class TinyImageNetResNet18(nn.Module):
    """The release's Tiny-ImageNet ResNet18 (models/resnet_imgnet.py, ``resnet18(width)``).

    Stem conv3x3(3 -> w) stride 1 + BN + ReLU, no max-pool (the release keeps the CIFAR stem on
    64x64 images); four stages of two TinyBasicBlocks, w, 2w, 4w, 8w channels, strides 1, 2, 2,
    2; global average pool; fc. Every convolution but the shortcut scales He-initialised
    (fan_out, ReLU), BN weight 1 and bias 0, fc PyTorch's default, as the release. The release's
    ``width`` argument changes only its BottleNeck blocks, so its ResNet18 is always w = 64; w is
    a parameter here for small test models. Seeded alike, the two modules start from the same
    weights bit for bit. 11,272,456 parameters for 200 classes at w = 64, as the release's (less its masks).

    Shapes: [B, in_channels, H, W] -> [B, num_classes] (H = W = 64 for Tiny-ImageNet).
    Differences from the release's module: the shortcut scale is a [C, 1, 1, 1] depthwise
    convolution weight (the release's ``Identity2d.weight`` is [C, 1, 1]), and there are no
    ``weight_mask`` buffers (the release's pruning masks, all ones). ``load_state_dict`` takes
    the release's state_dicts as they are (masks folded into the weights, scales reshaped).
    """

    def __init__(self, num_classes: int, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        _check_pos("width", width)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.in_planes = width
        self.conv2_x = self._make_layer(width, 1)
        self.conv3_x = self._make_layer(2 * width, 2)
        self.conv4_x = self._make_layer(4 * width, 2)
        self.conv5_x = self._make_layer(8 * width, 2)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        self._register_load_state_dict_pre_hook(self._from_release_layout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not isinstance(m, ScaledIdentity):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _from_release_layout(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Let a state_dict of the release's module load: its pruning masks (``*_mask``
        buffers, which its layers multiply into the weights at every forward) are folded into
        the weights, and its [C, 1, 1] shortcut scales take this module's [C, 1, 1, 1] shape."""
        for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("_mask")]:
            mask = state_dict.pop(key)
            target = key[: -len("_mask")]
            if target in state_dict:
                state_dict[target] = state_dict[target] * mask
        for name, m in self.named_modules():
            key = f"{prefix}{name}.weight"
            if isinstance(m, ScaledIdentity) and key in state_dict and state_dict[key].dim() == 3:
                state_dict[key] = state_dict[key].reshape(m.weight.shape)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in (stride, 1):
            blocks.append(TinyBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv5_x(self.conv4_x(self.conv3_x(self.conv2_x(self.conv1(x)))))
        return self.fc(torch.flatten(self.avg_pool(out), 1))


def _resnet18(num_classes: int, width: int = 64, in_channels: int = 3) -> nn.Module:
    return ResNet18(num_classes, width, in_channels, stem="cifar")


def _resnet18_imagenet(num_classes: int, width: int = 64, in_channels: int = 3) -> nn.Module:
    return ResNet18(num_classes, width, in_channels, stem="imagenet")


def _resnet18_tiny(num_classes: int, width: int = 64, in_channels: int = 3) -> nn.Module:
    return TinyImageNetResNet18(num_classes, width, in_channels)


def _wrn40_2(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> nn.Module:
    return WideResNet(40, 2, num_classes, drop_rate, in_channels)


def _cnn(num_classes: int, in_channels: int = 1, width: int = 16) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)


def _mlp(num_classes: int, in_channels: int = 1, image_size: int = 8, hidden: int = 128, depth: int = 2) -> nn.Module:
    return MLP(num_classes, in_channels, image_size, hidden, depth)


def _vit_tiny(num_classes: int, **kw) -> nn.Module:
    return TinyViT(num_classes, **kw)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet18,
    "resnet18_imagenet": _resnet18_imagenet,
    "resnet18_tiny": _resnet18_tiny,
    "wrn40_2": _wrn40_2,
    "cnn": _cnn,
    "mlp": _mlp,
    "vit_tiny": _vit_tiny,
}
MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def create_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Build a model by name.

    Names and keywords (defaults in brackets):
      * "resnet18": width [64], in_channels [3]. The release's CIFAR ResNet18.
      * "resnet18_imagenet": width [64], in_channels [3]. ImageNet stem, for 64x64 inputs.
      * "resnet18_tiny": width [64], in_channels [3]. The release's Tiny-ImageNet ResNet18.
      * "wrn40_2": in_channels [3], drop_rate [0.0].
      * "cnn": in_channels [1], width [16]. For 8x8 digits.
      * "mlp": in_channels [1], image_size [8], hidden [128], depth [2]. For 8x8 digits.
      * "vit_tiny": in_channels [3], image_size [32], patch_size [4], dim [64], depth [2],
        heads [4], mlp_ratio [2.0], pool ["cls"]. For digits: in_channels=1, image_size=8,
        patch_size=2.
    Initialisation draws from torch's global RNG: seed with torch.manual_seed for repeatability.

    Raises:
        ValueError: unknown name (the message lists the names) or bad sizes.
        TypeError: a keyword the model does not take.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; choose from {list(MODEL_NAMES)}")
    _check_pos("num_classes", num_classes)
    return _FACTORIES[name](num_classes, **kw)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (only those with requires_grad unless trainable_only=False)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
