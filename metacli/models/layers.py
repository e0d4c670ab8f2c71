"""Helpers shared by the backbones."""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn


def feature_dim(backbone: nn.Module, in_channels: int, image_size: int) -> int:
    """Width of the embedding ``backbone`` gives for one ``in_channels x image_size x image_size`` image, from a
    copy on the meta device: shapes only, so no memory for a large image and no CPU kernel (the native first block
    would be compiled even for a CUDA run)."""
    probe = copy.deepcopy(backbone).to("meta").eval()  # eval: a single image would break batch statistics
    return int(probe(torch.zeros(1, in_channels, image_size, image_size, device="meta")).shape[1])


def activation_bytes(backbone: nn.Module, in_channels: int, image_size: int) -> int:
    """Bytes of every layer's output in one forward of one image: a lower bound of what an image costs in
    training (which keeps them for the backward), measured on the meta device like :func:`feature_dim`."""
    probe = copy.deepcopy(backbone).to("meta").eval()
    sizes = []

    def record(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    for module in probe.modules():
        if not list(module.children()):
            module.register_forward_hook(record)
    probe(torch.zeros(1, in_channels, image_size, image_size, device="meta"))
    return sum(sizes)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout backbones keep weights in. Channels-last (NHWC) lets oneDNN and cuDNN pick their fast
    convolution kernels (measured in docs/performance.md)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def hooked(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` has a forward or backward hook of its own. Such hooks (feature extraction,
    Grad-CAM) run only when the module is called, so a path that computes a module without calling it must call it
    instead. Global hooks (``register_module_forward_hook``) are not counted: ``torch.utils.flop_counter`` sets them."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def check_images(image_size: int | None, backbone: str) -> None:
    """A convolutional backbone needs images; a dataset of vectors (sinusoid) gives ``image_size=None``."""
    if image_size is None:
        raise ValueError(f"{backbone} takes images, and this dataset's inputs are vectors: use backbone=mlp")
