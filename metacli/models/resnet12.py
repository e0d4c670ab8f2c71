"""ResNet-12, the few-shot backbone of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019)."""
from __future__ import annotations

import torch
from torch import nn

from metacli.models.layers import check_images, feature_dim, memory_format


class _Block(nn.Module):
    """Three conv3x3-BN layers with LeakyReLU, a 1x1 projection shortcut, then 2x2 max-pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """Four residual blocks of widths ``widths`` followed by global average pooling.

    Args:
        in_channels: image channels (injected from the dataset by the runner).
        image_size: image side (injected likewise).
        widths: channels of the four blocks; (64, 160, 320, 640) as in MetaOptNet.
        channels_last: keep the weights in NHWC layout, as the episode sampler keeps images, so the
            activations stay NHWC too (faster; same numbers).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 84, widths: tuple[int, ...] = (64, 160, 320, 640),
                 channels_last: bool = True) -> None:
        super().__init__()
        check_images(image_size, "ResNet-12")
        blocks, channels = [], in_channels
        for width in widths:
            blocks.append(_Block(channels, int(width)))
            channels = int(width)
        self.blocks = nn.Sequential(*blocks)
        self.to(memory_format=memory_format(channels_last))
        self.out_dim = feature_dim(self, in_channels, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))
