"""The four-block convolutional backbone of the few-shot literature (Vinyals et al. 2016; Finn et al. 2017)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from metacli.models.kernels import conv4_first_step, patch_conv, pooled_product
from metacli.models.layers import check_images, feature_dim, hooked, memory_format


class Conv4(nn.Module):
    """``blocks`` x (conv3x3 -> BatchNorm -> ReLU -> 2x down-sampling), ``hidden`` filters per block.

    Args:
        in_channels: image channels (injected from the dataset by the runner).
        image_size: image side (injected likewise), used only to compute ``out_dim``.
        hidden: filters per block: 64 as in most papers, 32 for MAML on mini-ImageNet.
        blocks: number of blocks.
        pool: ``"max"`` down-samples with 2x2 max-pooling and flattens the map (ProtoNet, Matching Nets);
            ``"stride"`` uses stride-2 convolutions and averages the final map (MAML's Omniglot network).
        channels_last: keep the weights in NHWC layout, as the episode sampler keeps images, so the
            activations stay NHWC too (faster; same numbers).

    The first convolution and its BatchNorm run as one product over image patches where they can
    (:mod:`metacli.models.kernels.patch_conv`): the same function, with fewer passes over the largest activation. A
    forward or backward hook on ``features`` or on a module of the first block turns that off, so that it runs.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, hidden: int = 64, blocks: int = 4,
                 pool: str = "max", channels_last: bool = True) -> None:
        super().__init__()
        check_images(image_size, "Conv4")
        if pool not in ("max", "stride"):
            raise ValueError(f"backbone.pool must be 'max' or 'stride', got {pool!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, hidden, 3, stride=2 if pool == "stride" else 1, padding=1),
                       nn.BatchNorm2d(hidden)]
            # Max-pooling before the ReLU gives the same values and gradients (the two commute) with the ReLU on
            # a quarter of the elements: 10% off a ProtoNet step on the CPU.
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)] if pool == "max" else [nn.ReLU(inplace=True)]
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.pool, self.channels_last = pool, channels_last
        self.to(memory_format=memory_format(channels_last))
        self.out_dim = feature_dim(self, in_channels, image_size)

    def blocks(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d | None]]:
        """Each block's convolution, BatchNorm and max-pooling (``None`` with ``pool="stride"``); a ReLU ends it."""
        layers, size = list(self.features), 4 if self.pool == "max" else 3
        return [(layers[i], layers[i + 1], layers[i + 2] if size == 4 else None) for i in range(0, len(layers), size)]

    def support_gradient_kernel(self, network: nn.Module, params: dict[str, torch.Tensor], family: str
                                ) -> Callable | None:
        """The per-task support gradients of ``network`` (this Conv4 as its ``backbone``, then a linear ``head``)
        for the shared first inner step of a meta-batch, written out over all tasks at once
        (:mod:`metacli.models.kernels.conv4_first_step`): a function of ``(x, y, tasks)``, or ``None`` where it
        does not apply (another network, other task family, autocast, hooks)."""
        if family != "classification" or getattr(network, "backbone", None) is not self \
                or not conv4_first_step.applies(network, params):
            return None
        return partial(conv4_first_step.support_grads, network, params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.features)
        conv, norm, pool = self.blocks()[0]
        if hooked([self.features, *layers[:4 if pool is not None else 3]]) or not patch_conv.applies(conv, norm, x):
            x = self.features(x)
        else:
            if pool is not None and pooled_product.applies(x):
                x, rest = patch_conv.conv_batchnorm_pool_relu(x, conv, norm), layers[4:]
            else:
                # With max-pooling between BatchNorm and ReLU, the pooling and the ReLU stay modules.
                x = patch_conv.conv_batchnorm(x, conv, norm, relu=pool is None)
                rest = layers[2 if pool is not None else 3:]
            x = x if self.channels_last else x.contiguous()  # both come channels-last
            for layer in rest:
                x = layer(x)
        return x.mean(dim=(2, 3)) if self.pool == "stride" else x.flatten(1)
