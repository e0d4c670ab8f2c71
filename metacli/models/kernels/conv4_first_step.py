"""MAML's shared first inner step for Conv4 + linear head, written out layer by layer instead of vmapped.

The first inner step of every task in a meta-batch starts from the same weights
(``metacli.execution.gradient_paths``, which asks for this kernel through :meth:`Conv4.support_gradient_kernel`).
Under ``torch.func.vmap`` that step cost as much as all the query passes on a CPU, although it sees a fifteenth
of the images. Traced operator by operator, the waste was layouts and indirection, not arithmetic:

- functorch takes each task's conv weight gradient as a grouped convolution over a task-major NCHW copy of the
  activations, and the gradients flowing back from it meet channels-last activations in BatchNorm and ReLU:
  elementwise kernels over mixed layouts ran at a tenth of their speed;
- the outer backward differentiates ``convolution_backward`` with ATen's double-backward formula, which takes the
  shared weight's gradient as a convolution over transposed activations, about five times slower than the native
  weight-gradient kernel on the 14x14 layer.

Here the support forward and its backward are explicit tensor code over all tasks at once: each convolution runs
once over every task's images with the shared weights; BatchNorm normalises with per-task statistics and is
differentiated by its closed-form backward; every elementwise operation sees channels-last activations as
contiguous ``[tasks, images * height * width, channels]`` views, so layouts never mix; the input gradients are
transposed convolutions, and the conv weights' per-task gradients are one grouped convolution
(:class:`_PerTaskWeightGrad`, whose backward is again native convolutions). Where
:func:`metacli.models.kernels.patch_conv.applies` (Omniglot's one-channel images), the first block is instead one
product over image patches with each task's statistics from its patch covariance (:class:`_PatchBlock`), which spares
the passes over the largest activation. Autograd differentiates all of it for second-order MAML. The per-task
gradients, running statistics and meta-gradient are those of the vmapped step (``tests/test_vectorize.py`` checks
them in float64, both poolings, first and second order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacli.models.kernels import patch_conv
from metacli.models.batchnorm import running_update
from metacli.models.layers import hooked

Params = dict[str, torch.Tensor]
Statistics = list[tuple[torch.Tensor, torch.Tensor]]


def applies(module: nn.Module, params: Params) -> bool:
    """Whether ``module`` is its Conv4 ``backbone`` followed by a linear ``head``, adapting all its parameters, with
    BatchNorm on batch statistics, outside autocast, and no module hook that the written-out step would skip: what
    :func:`support_grads` implements (for the cross-entropy of classification tasks only)."""
    backbone, head = module.backbone, getattr(module, "head", None)
    if not isinstance(head, nn.Linear) or hooked(module.modules()):
        return False
    if torch.is_autocast_enabled(head.weight.device.type):  # the vmapped step follows autocast's casts
        return False
    own = {name for name, _ in module.named_parameters() if name.startswith(("backbone.", "head."))}
    return set(params) == own and all(norm.training and norm.track_running_stats and norm.affine
                                      and conv.bias is not None for conv, norm, _ in backbone.blocks())


def _channels(t: torch.Tensor, tasks: int) -> torch.Tensor:
    """A channels-last ``[tasks * n, c, h, w]`` batch as its contiguous ``[tasks, n * h * w, c]`` view."""
    return t.permute(0, 2, 3, 1).reshape(tasks, -1, t.shape[1])


def _images(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_channels`, for a batch of ``shape`` (``[tasks * n, c, h, w]``)."""
    images, c, h, w = shape
    return t.reshape(images, h, w, c).permute(0, 3, 1, 2)


def _grouped(batch: torch.Tensor, tasks: int) -> torch.Tensor:
    """``[tasks * n, c, h, w]`` as the channels-last ``[n, tasks * c, h, w]`` input of a per-task grouped
    convolution."""
    n, (c, h, w) = batch.shape[0] // tasks, batch.shape[1:]
    per_task = batch.reshape(tasks, n, c, h, w).permute(1, 3, 4, 0, 2).contiguous()  # memory: n, h, w, task, c
    return per_task.permute(0, 3, 4, 1, 2).reshape(n, tasks * c, h, w)


def _ungrouped(grouped: torch.Tensor, tasks: int) -> torch.Tensor:
    """The inverse of :func:`_grouped`."""
    n, c, (h, w) = grouped.shape[0], grouped.shape[1] // tasks, grouped.shape[2:]
    per_image = grouped.reshape(n, tasks, c, h, w).permute(1, 0, 3, 4, 2).contiguous()  # memory: task, n, h, w, c
    return per_image.permute(0, 1, 4, 2, 3).reshape(tasks * n, c, h, w)


def _like_weight(grads: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-task gradients ``[tasks, *weight.shape]``, each with the weight's strides where they are dense (else
    contiguous)."""
    like = torch.empty_like(weight)
    out = torch.empty_strided(grads.shape, (like.numel(), *like.stride()), dtype=like.dtype, device=like.device)
    return out.copy_(grads)


class _PatchBlock:
    """The first block's convolution and BatchNorm as :mod:`metacli.models.kernels.patch_conv`'s product, with per-task
    statistics (each task's patch covariance), and its closed-form backward. It spares the passes over the
    largest activation that the elementary BatchNorm below makes, forward and backward."""

    def __init__(self, h: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d, p: dict[int, torch.Tensor],
                 tasks: int) -> None:
        rows, (images, height, width) = patch_conv.patches(h, conv.stride[0])
        rows = rows.view(tasks, -1, rows.shape[1])
        self.conv_weight, self.gamma = p[id(conv.weight)], p[id(norm.weight)]
        self.flat_weight = self.conv_weight.reshape(conv.out_channels, -1)
        self.centred, centre, var, self.spread = patch_conv.output_moments(rows, self.flat_weight, p[id(conv.bias)])
        self.statistics = running_update(centre, var, rows.shape[1])
        self.inv_std = torch.rsqrt(var + norm.eps)
        self.scale = self.gamma * self.inv_std
        flat = self.centred @ (self.flat_weight.t() * self.scale[:, None, :]) + p[id(norm.bias)]
        self.out = _images(flat, (images, conv.out_channels, height, width))

    def backward(self, d_scaled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-task gradients of the conv weight and bias and the BatchNorm weight and bias, in that order, from the
        gradient of BatchNorm's output as ``[tasks, n * h * w, channels]``."""
        d_product = self.centred.transpose(1, 2) @ d_scaled  # d/d(the scaled weights), [tasks, patch, out]
        d_scale = (d_product * self.flat_weight.t()).sum(dim=1)
        d_var = -0.5 * d_scale * self.gamma * self.inv_std ** 3
        d_weight = (d_product * self.scale[:, None, :]).transpose(1, 2) + 2 * d_var[:, :, None] * self.spread
        return (_like_weight(d_weight.reshape(-1, *self.conv_weight.shape), self.conv_weight),
                torch.zeros_like(d_scale),  # BatchNorm removes the conv bias
                d_scale * self.inv_std, d_scaled.sum(dim=1))


class _PerTaskWeightGrad(torch.autograd.Function):
    """The weight gradient of each task's slice of a convolution's batch: ``[tasks, *weight.shape]``, each task's
    gradient with the weight's strides (the later steps and the query pass adapt from it, and a first-layer weight
    with NCHW strides sends oneDNN to a kernel 5x slower on channels-last images)."""

    @staticmethod
    def forward(grad_out, images, weight, tasks, conv):
        out_channels, in_channels, kh, kw = weight.shape
        # Only the shape and layout of the weight argument matter to the kernel.
        layout = torch.empty((tasks * out_channels, kh, kw, in_channels), dtype=images.dtype, device=images.device)
        grads = torch.ops.aten.convolution_backward(
            _grouped(grad_out, tasks), _grouped(images, tasks), layout.permute(0, 3, 1, 2), None, conv.stride,
            conv.padding, conv.dilation, False, [0, 0], tasks, [False, True, False])[1]
        return _like_weight(grads.view(tasks, *weight.shape), weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, images, _, ctx.tasks, ctx.conv = inputs
        ctx.save_for_backward(grad_out, images)

    @staticmethod
    def backward(ctx, grad_weights):
        grad_out, images = ctx.saved_tensors
        tasks, conv = ctx.tasks, ctx.conv
        _, out_channels, in_channels, kh, kw = grad_weights.shape
        weights = torch.empty((tasks, out_channels, kh, kw, in_channels), dtype=grad_weights.dtype,
                              device=grad_weights.device)
        weights.copy_(grad_weights.permute(0, 1, 3, 4, 2))
        weights = weights.view(tasks * out_channels, kh, kw, in_channels).permute(0, 3, 1, 2)
        grouped_images = _grouped(images, tasks)
        d_grad_out = d_images = None
        if ctx.needs_input_grad[0]:
            d_grad_out = _ungrouped(F.conv2d(grouped_images, weights, None, conv.stride, conv.padding, conv.dilation,
                                             tasks), tasks)
        if ctx.needs_input_grad[1]:
            d_images = _ungrouped(torch.ops.aten.convolution_backward(
                _grouped(grad_out, tasks), grouped_images, weights, None, conv.stride, conv.padding, conv.dilation,
                False, [0, 0], tasks, [True, False, False])[0], tasks)
        return d_grad_out, d_images, None, None, None


def support_grads(module: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
                  tasks: int) -> tuple[Params, list[nn.BatchNorm2d], Statistics]:
    """Per-task gradients ``[tasks, *p.shape]`` of each task's mean support cross-entropy, for a module that
    :func:`applies`; with the BatchNorm layers in call order and their per-task ``(mean, unbiased var)``, as
    :func:`metacli.models.batchnorm.apply_statistics` takes them. ``x``: ``[tasks * n, c, h, w]``, ``y``:
    ``[tasks * n]``."""
    backbone, head, n = module.backbone, module.head, x.shape[0] // tasks
    names = {id(q): name for name, q in module.named_parameters() if name in params}
    p = {key: params[name] for key, name in names.items()}  # module parameter -> the value to adapt
    saved, statistics = [], []
    h = x.contiguous(memory_format=torch.channels_last)
    for conv, norm, pool in backbone.blocks():
        if not saved and patch_conv.applies(conv, norm, h):
            patch = _PatchBlock(h, conv, norm, p, tasks)
            z, normalised, inv_std, out = None, None, None, patch.out
            statistics.append(patch.statistics)
        else:
            z, patch = F.conv2d(h, p[id(conv.weight)], p[id(conv.bias)], conv.stride, conv.padding,
                                conv.dilation), None
            flat = _channels(z, tasks)
            mean = flat.mean(dim=1, keepdim=True)
            centred = flat - mean
            var = (centred * centred).mean(dim=1, keepdim=True)
            inv_std = torch.rsqrt(var + norm.eps)
            normalised = centred * inv_std
            statistics.append(running_update(mean.flatten(1), var.flatten(1), flat.shape[1]))
            out = _images(normalised * p[id(norm.weight)] + p[id(norm.bias)], z.shape)
        pre_pool, indices = out.detach(), None
        if pool is not None:  # Conv4 pools before the ReLU (the two commute)
            out, indices = F.max_pool2d(out, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                        pool.ceil_mode, return_indices=True)
        out = out.relu()
        z_shape = None if z is None else z.shape
        saved.append((conv, norm, pool, h, z_shape, patch, normalised, inv_std, pre_pool, indices, out))
        h = out
    features = h.mean(dim=(2, 3)) if backbone.pool == "stride" else h.flatten(1)
    logits = features @ p[id(head.weight)].t() + p[id(head.bias)]
    # d(mean cross-entropy)/d(logits), each task averaging over its own n images.
    d_logits = (logits.softmax(dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / n
    per_task = d_logits.view(tasks, n, -1)
    grads = {names[id(head.weight)]: per_task.transpose(1, 2) @ features.view(tasks, n, -1),
             names[id(head.bias)]: per_task.sum(dim=1)}
    d_features = d_logits @ p[id(head.weight)]
    if backbone.pool == "stride":
        d_h = (d_features[:, :, None, None] / (h.shape[2] * h.shape[3])).expand(h.shape)
    else:
        d_h = d_features.view(h.shape)
    for block in reversed(range(len(saved))):
        conv, norm, pool, block_in, z_shape, patch, normalised, inv_std, pre_pool, indices, out = saved[block]
        d_out = d_h * (out > 0)
        if pool is not None:
            d_out = torch.ops.aten.max_pool2d_with_indices_backward(
                d_out, pre_pool, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, indices)
        d_scaled = _channels(d_out, tasks)
        if patch is not None:  # the first block, which needs no gradient for the images
            for q, grad in zip((conv.weight, conv.bias, norm.weight, norm.bias), patch.backward(d_scaled)):
                grads[names[id(q)]] = grad
            continue
        grads[names[id(norm.bias)]] = d_scaled.sum(dim=1)
        grads[names[id(norm.weight)]] = (d_scaled * normalised).sum(dim=1)
        d_norm = d_scaled * p[id(norm.weight)]
        d_flat = inv_std * (d_norm - d_norm.mean(dim=1, keepdim=True)
                            - normalised * (d_norm * normalised).mean(dim=1, keepdim=True))
        d_z = _images(d_flat, z_shape)
        weight = p[id(conv.weight)]
        grads[names[id(conv.weight)]] = _PerTaskWeightGrad.apply(d_z, block_in, weight.detach(), tasks, conv)
        grads[names[id(conv.bias)]] = d_flat.sum(dim=1)
        if block > 0:  # no gradient for the images
            extra = [block_in.shape[i] - ((z_shape[i] - 1) * conv.stride[i - 2] - 2 * conv.padding[i - 2]
                                          + conv.dilation[i - 2] * (weight.shape[i] - 1) + 1) for i in (2, 3)]
            d_h = F.conv_transpose2d(d_z, weight, None, conv.stride, conv.padding, extra, 1, conv.dilation)
    return grads, [norm for _, norm, *_ in saved], statistics
