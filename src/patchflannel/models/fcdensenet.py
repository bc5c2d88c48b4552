"""FC-DenseNet ("One Hundred Layers Tiramisu", Jégou et al. 2017) for lung segmentation (SPEC.md stage 1).

Input (B, 1, H, W) with H, W multiples of 32; output (B, 1, H, W) lung logits (sigmoid > 0.5 is lung).
"""

from __future__ import annotations

import torch
from torch import nn

from patchflannel.models.registry import register_model


class DenseLayer(nn.Sequential):
    """BN-ReLU-conv3x3-Dropout producing ``growth`` new feature maps."""

    def __init__(self, cin: int, growth: int, dropout: float) -> None:
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, growth, 3, padding=1, bias=True), nn.Dropout(dropout))


class DenseBlock(nn.Module):
    """``n`` dense layers; returns the concatenation of the new maps (and of the input too if ``keep_input``)."""

    def __init__(self, cin: int, n: int, growth: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, dropout) for i in range(n))

    def forward(self, x: torch.Tensor, keep_input: bool = True) -> torch.Tensor:
        new = []
        for layer in self.layers:
            out = layer(x)
            x = torch.cat([x, out], 1)
            new.append(out)
        return x if keep_input else torch.cat(new, 1)


class TransitionDown(nn.Sequential):
    """BN-ReLU-conv1x1-Dropout-maxpool2."""

    def __init__(self, c: int, dropout: float) -> None:
        super().__init__(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c, 1),
                         nn.Dropout(dropout), nn.MaxPool2d(2))


class FCDenseNet(nn.Module):
    """The FC-DenseNet family: ``down`` layers per block on the way down, ``bottleneck``, mirrored on the way up."""

    def __init__(self, down: tuple[int, ...], bottleneck: int, growth: int, first: int = 48,
                 in_channels: int = 1, n_classes: int = 1, dropout: float = 0.2) -> None:
        super().__init__()
        self.first = nn.Conv2d(in_channels, first, 3, padding=1)
        c = first
        self.down_blocks, self.trans_down, skips = nn.ModuleList(), nn.ModuleList(), []
        for n in down:
            self.down_blocks.append(DenseBlock(c, n, growth, dropout))
            c += n * growth
            skips.append(c)
            self.trans_down.append(TransitionDown(c, dropout))
        self.bottleneck = DenseBlock(c, bottleneck, growth, dropout)
        prev_new = bottleneck * growth
        self.trans_up, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for n, skip in zip(reversed(down), reversed(skips)):
            self.trans_up.append(nn.ConvTranspose2d(prev_new, prev_new, 3, stride=2, padding=1, output_padding=1))
            c = prev_new + skip
            self.up_blocks.append(DenseBlock(c, n, growth, dropout))
            prev_new = n * growth
        self.final = nn.Conv2d(c + prev_new, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"FC-DenseNet input sides must be multiples of 32, got {tuple(x.shape[-2:])}")
        x = self.first(x)
        skips = []
        for block, td in zip(self.down_blocks, self.trans_down):
            x = block(x)
            skips.append(x)
            x = td(x)
        x = self.bottleneck(x, keep_input=False)
        last = len(self.up_blocks) - 1
        for i, (tu, block) in enumerate(zip(self.trans_up, self.up_blocks)):
            x = torch.cat([tu(x), skips.pop()], 1)
            x = block(x, keep_input=i == last)
        return self.final(x)


@register_model("segmentation", "fcdensenet103")
def fcdensenet103(in_channels: int = 1, n_classes: int = 1, dropout: float = 0.2) -> FCDenseNet:
    """FC-DenseNet103: blocks (4, 5, 7, 10, 12), bottleneck 15, growth 16 (about 9.4M parameters)."""
    return FCDenseNet((4, 5, 7, 10, 12), 15, 16, 48, in_channels, n_classes, dropout)


@register_model("segmentation", "fcdensenet67")
def fcdensenet67(in_channels: int = 1, n_classes: int = 1, dropout: float = 0.2) -> FCDenseNet:
    """FC-DenseNet67: 5 layers a block, growth 16."""
    return FCDenseNet((5,) * 5, 5, 16, 48, in_channels, n_classes, dropout)


@register_model("segmentation", "fcdensenet56")
def fcdensenet56(in_channels: int = 1, n_classes: int = 1, dropout: float = 0.2) -> FCDenseNet:
    """FC-DenseNet56: 4 layers a block, growth 12."""
    return FCDenseNet((4,) * 5, 4, 12, 48, in_channels, n_classes, dropout)
