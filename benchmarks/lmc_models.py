"""The models of the linear-mode-connectivity suite: small timm models for 1-channel 14×14 digits.

Every family is timm's own class with a small configuration; ``width`` multiplies the channels.

- ``resnet``: timm ``ResNet`` with ``BasicBlock`` in the ResNet-20 layout (3 stages of ``blocks``
  blocks, 16w-32w-64w channels). timm's class always builds four stages and a 64-channel stem,
  so the stem conv is rebuilt with 16w channels and ``layer4`` is replaced by an identity (the
  head reads 64w channels either way). The stem keeps timm's 7×7 stride-2 conv and max-pool, so
  14×14 inputs give 4×4, 2×2 and 1×1 maps in the three stages. Norms: ``"ln"`` (GroupNorm with
  one group, i.e. LayerNorm over C, H, W), ``"bn"`` (BatchNorm) or ``"none"`` (no normalisation;
  the last conv of every block starts at zero, as in SkipInit, so the untrained net is stable).
- ``vgg``: timm ``VGG`` with cfg ``[16w, M, 32w, M, 64w, 64w, M]``, no norm, ``mlp_ratio`` 1/16
  (its ConvMlp head still ends in timm's fixed 4,096 features).
- ``convnext``: timm ``ConvNeXt``, depths (1, 1, 1, 1), dims 8w-16w-32w-64w, 1×1 patch stem.
- ``mixer``: timm ``MlpMixer``, 2×2 patches (49 tokens), 4 blocks, embedding 32w.

>>> import torch
>>> build("resnet", 1, norm="ln")(torch.zeros(2, 1, 14, 14)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["build", "FAMILIES"]

FAMILIES = ("resnet", "vgg", "convnext", "mixer")


def _norm(norm: str):
    from timm.layers import GroupNorm1

    try:
        return {"ln": GroupNorm1, "bn": nn.BatchNorm2d, "none": nn.Identity}[norm]
    except KeyError:
        raise ValueError(f"unknown norm {norm!r}; expected 'ln', 'bn' or 'none'") from None


def resnet(width: int, norm: str = "ln", blocks: int = 3) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    nl, c = _norm(norm), 16 * width
    m = ResNet(BasicBlock, [blocks, blocks, blocks, 1], num_classes=10, in_chans=1,
               channels=(c, 2 * c, 4 * c, 4 * c), norm_layer=nl, zero_init_last=norm != "none")
    m.conv1 = nn.Conv2d(1, c, kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nl(c)
    m.layer1[0] = BasicBlock(c, c, norm_layer=nl)  # its input now has c channels, not 64: no downsample
    if norm == "none":
        for layer in (m.layer1, m.layer2, m.layer3):
            for block in layer:
                nn.init.zeros_(block.conv2.weight)
    else:
        for block in m.layer1:  # the rebuilt first block gets timm's zero-init of its last norm too
            block.zero_init_last()
    m.layer4 = nn.Identity()
    return m


def vgg(width: int) -> nn.Module:
    from timm.models.vgg import VGG

    c = 16 * width
    return VGG([c, "M", 2 * c, "M", 4 * c, 4 * c, "M"], num_classes=10, in_chans=1, mlp_ratio=1 / 16)


def convnext(width: int) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    c = 8 * width
    return ConvNeXt(in_chans=1, num_classes=10, depths=(1, 1, 1, 1), dims=(c, 2 * c, 4 * c, 8 * c), patch_size=1)


def mixer(width: int) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=14, in_chans=1, patch_size=2, num_blocks=4, embed_dim=32 * width)


def build(family: str, width: int, norm: str = "ln", blocks: int = 3) -> nn.Module:
    """A fresh model of ``family`` at width multiplier ``width`` (uses the global torch seed)."""
    if family == "resnet":
        return resnet(width, norm, blocks)
    if family in ("vgg", "convnext", "mixer"):
        return globals()[family](width)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
