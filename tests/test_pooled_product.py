"""The max-pool Conv4's first block as one native kernel (metacli.models.kernels.pooled_product) computes what the
native PyTorch kernels compute: values, running statistics, first and second derivatives, in every BatchNorm
mode."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metacli.models.batchnorm import batch_statistics_only
from metacli.algorithms.maml import MAML
from metacli.models.kernels import patch_conv, pooled_product
from metacli.models.kernels.native import NativeKernels
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step
from metacli.execution.settings import Execution
from test_vectorize import random_batch


def block(channels: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    filters = 4 * (9 * channels + 1)  # the narrowest the patch product takes
    conv, norm = nn.Conv2d(channels, filters, 3, padding=1).double(), nn.BatchNorm2d(filters).double()
    with torch.no_grad():  # affine parameters (some negative) and running statistics away from their defaults
        norm.weight.uniform_(-1.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    return conv, norm


def native(x, conv, norm):
    return torch.relu(F.max_pool2d(nn.BatchNorm2d.forward(norm, conv(x)), 2))


def images(channels: int) -> torch.Tensor:
    x = torch.rand(6, channels, 12, 10, dtype=torch.float64) + 0.3
    x[:, :, :4] = 0.5  # flat background, as in Omniglot: ties inside pooling windows
    return x.contiguous(memory_format=torch.channels_last)


def test_the_kernel_builds_here():
    assert pooled_product.available()


def test_a_failed_build_leaves_the_patch_product(monkeypatch, tmp_path, caplog):
    kernels = pooled_product._kernels
    monkeypatch.setattr(pooled_product, "_kernels", NativeKernels(tmp_path / "missing.cpp", kernels.what,
                                                                   kernels.first_use, kernels.fallback))
    x = images(1)
    with caplog.at_level(logging.WARNING, logger="metacli.models.kernels.native"):
        assert not pooled_product.applies(x)
    assert "did not build" in caplog.text and "patch product" in caplog.text
    torch.manual_seed(0)
    model, omniglot = Conv4(hidden=40, pool="max").double(), torch.rand(4, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(model(omniglot), model.features(omniglot).flatten(1), rtol=1e-10, atol=1e-12)


def test_the_flop_counter_sees_the_native_twin():
    model = Conv4(hidden=40, pool="max").double()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    with FlopCounterMode(display=False) as inside:
        model(x)
    with FlopCounterMode(display=False) as twin, pooled_product.disabled():
        model(x)
    assert pooled_product.applies(x)  # enabled again on leaving
    assert twin.get_total_flops() > inside.get_total_flops() > 0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["train", "eval", "transductive"])
def test_values_statistics_and_two_derivatives_match_the_native_kernels(mode, channels):
    conv, norm = block(channels)
    ref_conv, ref_norm = copy.deepcopy(conv), copy.deepcopy(norm)
    x = images(channels)
    assert pooled_product.applies(x) and patch_conv.applies(conv, norm, x)
    for module in (norm, ref_norm):
        module.train(mode != "eval")
    statistics = batch_statistics_only if mode == "transductive" else lambda _: contextlib.nullcontext()
    with statistics(norm), statistics(ref_norm):
        out = patch_conv.conv_batchnorm_pool_relu(x, conv, norm)
        ref = native(x, ref_conv, ref_norm)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last) and (out == 0).any() and (out > 0).any()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(norm, name), getattr(ref_norm, name), rtol=1e-12, atol=1e-14)

    params, ref_params = [*conv.parameters(), *norm.parameters()], [*ref_conv.parameters(), *ref_norm.parameters()]
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weights).sum(), params, create_graph=True)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_params, create_graph=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    # Second derivatives through the gradient: a Hessian-vector product, as second-order MAML takes them.
    directions = [torch.randn_like(p) for p in params]
    # An unused parameter's zero is materialised on either side, so every pair is compared.
    hvp = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, directions)), params, materialize_grads=True)
    ref_hvp = torch.autograd.grad(sum((g * d).sum() for g, d in zip(ref_grads, directions)), ref_params,
                                  materialize_grads=True)
    for h, r in zip(hvp, ref_hvp):
        torch.testing.assert_close(h, r, rtol=1e-8, atol=1e-10)


def test_a_nan_weight_reaches_the_output_as_natively():
    conv, norm = block(1)
    with torch.no_grad():
        conv.weight[3] = float("nan")
    out = patch_conv.conv_batchnorm_pool_relu(images(1), conv, norm)
    assert out[:, 3].isnan().all() and not out[:, :3].isnan().any()


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_moments_match_the_patch_matrix_far_from_zero(channels):
    """The one-pass sums are taken in float64: on float32 images around 50 (a covariance 4 orders of magnitude below
    the squared mean) they still match the two-pass moments of the patch matrix in float64."""
    torch.manual_seed(0)
    x = (50 + torch.rand(5, channels, 8, 6)).contiguous(memory_format=torch.channels_last)
    rows, _ = patch_conv.patches(x.double(), 1)
    mean, covariance = pooled_product.patch_moments(pooled_product.padded(x))
    centred = rows - rows.mean(0)
    assert mean.dtype == covariance.dtype == torch.float32
    torch.testing.assert_close(mean.double(), rows.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(covariance.double(), centred.T @ centred / rows.shape[0], rtol=2e-6, atol=1e-6)


def test_float32_agrees_with_the_patch_product():
    torch.manual_seed(0)
    model = Conv4(pool="max")
    x = torch.randn(20, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    conv, norm, _ = model.blocks()[0]
    fused = patch_conv.conv_batchnorm_pool_relu(x, conv, norm)
    unfused = torch.relu(F.max_pool2d(patch_conv.conv_batchnorm(x, conv, norm, relu=False), 2))
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_conv4_skips_it_under_vmap_for_odd_sizes_half_precision_and_images_that_want_gradients():
    x = torch.rand(2, 4, 1, 28, 28, dtype=torch.float64)
    assert pooled_product.applies(x[0])
    assert not pooled_product.applies(x[0].clone().requires_grad_())
    assert not pooled_product.applies(torch.rand(4, 1, 27, 27))
    assert not pooled_product.applies(torch.rand(4, 1, 28, 28, dtype=torch.bfloat16))
    seen = []
    torch.func.vmap(lambda images: seen.append(pooled_product.applies(images)) or images.sum())(x)
    assert seen == [False]


@pytest.mark.parametrize("setting", ["serial", "task_threads", "checkpoint_inner"])
def test_second_order_maml_through_it_matches_the_native_kernels(setting, monkeypatch):
    """Two second-order MAML steps (two inner steps, so the support passes go through the kernels' double
    backward) on a max-pool Conv4, against the same steps with neither the kernel nor the patch product."""
    batch = random_batch(tasks=4, queries=2)

    def train(native: bool):
        torch.manual_seed(0)
        learner = MAML(Conv4(hidden=40, pool="max"), n_way=5, inner_steps=2).double()
        execution = Execution(batch_first_step=False, checkpoint_inner=setting == "checkpoint_inner",
                              task_threads=2 if setting == "task_threads" else 1)
        with monkeypatch.context() as patch:
            if native:
                patch.setattr(patch_conv, "applies", lambda *_: False)
            for _ in range(2):
                meta_train_step(learner, batch, execution)
        return {n: p.grad for n, p in learner.named_parameters()}, dict(learner.named_buffers())

    calls = []
    kernel = pooled_product.pooled_product
    monkeypatch.setattr(pooled_product, "pooled_product", lambda *args: calls.append(1) or kernel(*args))
    (grads, buffers), (ref_grads, ref_buffers) = train(native=False), train(native=True)
    assert calls  # the kernel path was taken
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-12, msg=name)
    for name, ref in ref_buffers.items():
        torch.testing.assert_close(buffers[name], ref, rtol=1e-9, atol=1e-12, msg=name)


CONSTRUCTION = """
from metacli.models.kernels import pooled_product
from metacli.models.conv4 import Conv4
from metacli.models.resnet12 import ResNet12
Conv4(), Conv4(pool="stride"), ResNet12()
print(not pooled_product._kernels.tried)
"""


def test_building_a_backbone_builds_no_kernel():
    """Sizing the head takes no forward on the CPU, so a CUDA run never compiles this CPU kernel (only a CPU
    forward that can use it does)."""
    done = subprocess.run([sys.executable, "-c", CONSTRUCTION], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stdout + done.stderr


FIRST_BUILD = """
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from metacli.models.kernels import pooled_product
print(pooled_product._kernels.module() is None)
"""


def test_a_first_build_says_so_before_it_starts(tmp_path):
    """An empty kernel cache means a build of about a minute: a line says so before the wait. (A compiler that
    fails at once stands in for the build, which leaves the patch product.)"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "false"}
    done = subprocess.run([sys.executable, "-c", FIRST_BUILD], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stdout + done.stderr
    lines = done.stderr.splitlines()
    building = next(i for i, line in enumerate(lines) if line.startswith("building the native pooled-product"))
    assert "did not build" in " ".join(lines[building + 1:])
