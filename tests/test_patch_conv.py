"""The first convolution and BatchNorm as one product over patches (metacli.models.kernels.patch_conv) computes what the
native kernels compute: values, running statistics, first and second derivatives, in every BatchNorm mode."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from metacli.algorithms.maml import MAML
from metacli.models.kernels import patch_conv
from metacli.models.batchnorm import batch_statistics_only, recorded_statistics, throwaway_statistics
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step
from metacli.execution.settings import Execution
from test_vectorize import random_batch


def layers(channels: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(channels, 12, 3, stride=stride, padding=1).double(), nn.BatchNorm2d(12).double()
    with torch.no_grad():  # affine parameters and running statistics away from their initial values
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    return conv, norm


def native(x, conv, norm, relu):
    out = nn.BatchNorm2d.forward(norm, conv(x))
    return torch.relu(out) if relu else out


def images(channels: int, size: int = 11) -> torch.Tensor:
    # Not centred, so that the bias and the patch mean matter.
    x = torch.rand(6, channels, size, size, dtype=torch.float64) + 0.3
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["train", "eval", "transductive"])
def test_values_statistics_and_gradients_match_the_native_kernels(mode, channels, stride, relu):
    conv, norm = layers(channels, stride)
    ref_conv, ref_norm = copy.deepcopy(conv), copy.deepcopy(norm)
    x = images(channels)
    for module in (norm, ref_norm):
        module.train(mode != "eval")
    statistics = batch_statistics_only if mode == "transductive" else lambda _: contextlib.nullcontext()
    with statistics(norm), statistics(ref_norm):
        out = patch_conv.conv_batchnorm(x, conv, norm, relu)
        ref = native(x, ref_conv, ref_norm, relu)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(norm, name), getattr(ref_norm, name), rtol=1e-12, atol=1e-14)
    if mode == "train":  # the buffers did move
        assert norm.num_batches_tracked.item() == 1
    weights = [conv.weight, conv.bias, norm.weight, norm.bias]
    ref_weights = [ref_conv.weight, ref_conv.bias, ref_norm.weight, ref_norm.bias]
    target = torch.randn_like(ref)
    grads = torch.autograd.grad((out * target).sum(), weights, create_graph=True)
    ref_grads = torch.autograd.grad((ref * target).sum(), ref_weights, create_graph=True)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11)
    # Second order, as MAML differentiates its inner step.
    second = torch.autograd.grad(sum((g ** 2).sum() for g in grads), weights, materialize_grads=True)
    ref_second = torch.autograd.grad(sum((g ** 2).sum() for g in ref_grads), ref_weights, materialize_grads=True)
    scale = max(g.abs().max().item() for g in ref_second)  # the conv bias's are rounding noise around zero
    for grad, ref_grad in zip(second, ref_second):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12 * scale)


def test_recorded_and_throwaway_statistics_leave_the_buffers_alone():
    conv, norm = layers(1, 2)
    before = norm.running_mean.clone()
    with recorded_statistics(norm) as record:
        patch_conv.conv_batchnorm(images(1), conv, norm, relu=True)
    assert torch.equal(norm.running_mean, before)
    assert record.layers == [norm] and len(record.statistics) == 1
    with throwaway_statistics(norm):
        patch_conv.conv_batchnorm(images(1), conv, norm, relu=True)
    assert torch.equal(norm.running_mean, before) and norm.num_batches_tracked.item() == 0
    patch_conv.conv_batchnorm(images(1), conv, norm, relu=True)
    assert not torch.equal(norm.running_mean, before) and norm.num_batches_tracked.item() == 1


def test_taken_by_omniglot_conv4_only_where_it_pays():
    x = torch.zeros(2, 1, 28, 28)
    omniglot = Conv4(in_channels=1, hidden=64)
    assert patch_conv.applies(omniglot.features[0], omniglot.features[1], x)
    # mini-ImageNet's first layer: its 27-value patches are nearly as wide as the output (slower, measured).
    colour = Conv4(in_channels=3, image_size=84, hidden=32)
    assert not patch_conv.applies(colour.features[0], colour.features[1], torch.zeros(2, 3, 84, 84))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not patch_conv.applies(omniglot.features[0], omniglot.features[1], x)


@pytest.mark.parametrize("pool", ["max", "stride"])
def test_conv4_gives_the_native_forward(pool):
    torch.manual_seed(0)
    model = Conv4(hidden=40, pool=pool).double()
    reference = copy.deepcopy(model)
    x = images(1, size=28)
    torch.testing.assert_close(model(x), reference.features(x).mean(dim=(2, 3)) if pool == "stride"
                               else reference.features(x).flatten(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pool, hooked", [("max", i) for i in range(4)] + [("stride", i) for i in range(3)]
                         + [("max", None), ("stride", None)])
def test_a_forward_hook_on_the_first_block_or_the_stack_runs_and_sees_the_native_values(pool, hooked):
    """The fused first block skips its modules' calls (and Conv4 never calls ``features`` itself when it fuses); a
    forward hook on any of them turns the fusion off instead of being skipped silently. ``None`` hooks ``features``."""
    torch.manual_seed(0)
    model = Conv4(hidden=40, pool=pool).double()
    x = images(1, size=28)
    assert patch_conv.applies(*model.blocks()[0][:2], x)  # the block would be fused without the hook
    target = model.features if hooked is None else model.features[hooked]
    seen = []
    target.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    model(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], model.features[:None if hooked is None else hooked + 1](x), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("pool", ["max", "stride"])
def test_a_backward_hook_on_the_first_convolution_runs(pool):
    torch.manual_seed(0)
    model = Conv4(hidden=40, pool=pool).double()
    seen = []
    model.features[0].register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].shape))
    x = images(1, size=28).requires_grad_()  # the hook warns when no input of the module needs a gradient
    model(x).sum().backward()
    assert seen == [torch.Size([6, 40, 28 if pool == "max" else 14, 28 if pool == "max" else 14])]


def test_the_pooled_kernel_path_refuses_a_strided_convolution():
    conv, norm = layers(1, stride=2)
    with pytest.raises(ValueError, match="stride-1"):
        patch_conv.conv_batchnorm_pool_relu(images(1, size=12), conv, norm)


@pytest.mark.parametrize("setting", ["checkpoint_inner", "task_threads", "cumulative_momentum", "nchw"])
def test_meta_training_through_it_matches_the_native_kernels(setting, monkeypatch):
    """Two second-order MAML steps on a Conv4 wide enough to take the patch product, against the same steps on
    the native kernels: recomputation under checkpointing, statistics deferred in task threads, BatchNorm's
    cumulative average (momentum None), NCHW weights."""
    batch = random_batch(tasks=4, queries=2)

    def train(native: bool):
        torch.manual_seed(0)
        learner = MAML(Conv4(hidden=40, pool="stride", channels_last=setting != "nchw"), n_way=5,
                       inner_steps=2).double()
        execution = Execution(checkpoint_inner=setting == "checkpoint_inner",
                              task_threads=2 if setting == "task_threads" else 1)
        conv, norm, _ = learner.backbone.blocks()[0]
        if setting == "cumulative_momentum":
            for module in learner.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = None
        with monkeypatch.context() as patch:
            if native:
                patch.setattr(patch_conv, "applies", lambda *_: False)
            assert patch_conv.applies(conv, norm, batch.query_x[0]) != native
            for _ in range(2):
                meta_train_step(learner, batch, execution)
        return {n: p.grad for n, p in learner.named_parameters()}, dict(learner.named_buffers())

    (grads, buffers), (ref_grads, ref_buffers) = train(native=False), train(native=True)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-12, msg=name)
    for name, ref in ref_buffers.items():
        torch.testing.assert_close(buffers[name], ref, rtol=1e-9, atol=1e-12, msg=name)
    assert ref_buffers["backbone.features.1.num_batches_tracked"].item() > 0
