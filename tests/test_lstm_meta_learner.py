"""The LSTM meta-learner: preprocessing, the cell-state update, the meta-gradient (into c_0, with the learner's
gradient a constant), side-effect-free evaluation, its config, and learning on synthetic glyphs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

import metacli.cli
from metacli.algorithms.base import BN_MODES
from metacli.algorithms.inner_loop import functional_forward
from metacli.algorithms.lstm_meta_learner import LSTMMetaLearner, preprocess
from metacli.models.conv4 import Conv4
from metacli.models.kernels import coordinate_lstm
from metacli.execution.meta_batch import meta_train_step

from learning import assert_learned, batch, episode, meta_train

pytestmark = pytest.mark.usefixtures("one_thread")


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def set_gates(learner: LSTMMetaLearner, forget: float, input_: float) -> None:
    """Constant gates: ``f_t = forget`` and ``i_t = input_`` for every coordinate and step."""
    with torch.no_grad():
        for gate, value in ((learner.forget_gate, forget), (learner.input_gate, input_)):
            gate.weight.zero_()
            gate.bias.fill_(logit(value))


def test_preprocess_both_branches():
    x = torch.tensor([1.0, -math.exp(-5), math.exp(10), math.exp(-12), -1e-6, 0.0])
    expected = torch.tensor([[0.0, 1.0],                 # |x| >= e^-10: (log|x| / 10, sign x)
                             [-0.5, -1.0],
                             [1.0, 1.0],
                             [-1.0, math.exp(-2)],       # |x| < e^-10: (-1, e^10 x)
                             [-1.0, -1e-6 * math.exp(10)],
                             [-1.0, 0.0]])
    torch.testing.assert_close(preprocess(x), expected)


def test_update_is_forget_times_cell_minus_input_times_gradient():
    torch.manual_seed(0)
    learner = LSTMMetaLearner(Conv4(hidden=4), 5, hidden_size=3)
    set_gates(learner, forget=0.9, input_=0.2)
    # f_t also reads θ_{t-1} and i_t the previous input gate: each must arrive in its own slot of [h, θ, gate].
    with torch.no_grad():
        learner.forget_gate.weight[0, 3] = 1.0
        learner.input_gate.weight[0, 4] = 2.0
    cell, grad, loss = torch.randn(50), torch.randn(50), torch.tensor(1.3)
    first, state = learner.update(cell, grad, loss)
    forget = torch.sigmoid(cell + logit(0.9))
    torch.testing.assert_close(first, forget * cell - 0.2 * grad)
    second, _ = learner.update(first, grad, loss, state)
    forget, input_ = torch.sigmoid(first + logit(0.9)), torch.sigmoid(torch.tensor(2 * 0.2 + logit(0.2)))
    torch.testing.assert_close(second, forget * first - input_ * grad)


def test_update_computes_the_papers_cell_with_nn_lstm_cell():
    """The coordinates-last update is nn.LSTMCell over [preprocessed ∇, preprocessed L] per coordinate, then the
    gates over [h, θ, previous gate]: the same values and gradients over three steps (float64)."""
    torch.manual_seed(0)
    learner = LSTMMetaLearner(Conv4(hidden=4), 5, hidden_size=3).double()
    cell, loss = torch.randn(40, dtype=torch.float64, requires_grad=True), torch.tensor(0.7, dtype=torch.float64)
    grads = [torch.randn(40, dtype=torch.float64) for _ in range(3)]

    def reference() -> torch.Tensor:
        c, lstm_state = cell, None
        forget = input_ = torch.zeros(40, 1, dtype=torch.float64)
        for grad in grads:
            lstm_state = learner.input_lstm(torch.cat([preprocess(grad), preprocess(loss).expand(40, 2)], dim=1),
                                            lstm_state)
            h, theta = lstm_state[0], c.unsqueeze(1)
            forget = torch.sigmoid(learner.forget_gate(torch.cat([h, theta, forget], dim=1)))
            input_ = torch.sigmoid(learner.input_gate(torch.cat([h, theta, input_], dim=1)))
            c = forget.squeeze(1) * c - input_.squeeze(1) * grad
        return c

    def updated() -> torch.Tensor:
        c, state = cell, None
        for grad in grads:
            c, state = learner.update(c, grad, loss, state)
        return c

    results = []
    for run in (reference, updated):
        learner.zero_grad()
        cell.grad = None
        value = run()
        value.pow(2).sum().backward()
        results.append([value, cell.grad, *(p.grad for p in learner.parameters() if p.grad is not None)])
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)


def test_the_native_update_matches_the_pytorch_operations():
    """The fused kernel (float32, CPU) against the learner's PyTorch operations: values of every output and the
    gradients of the initial cell and of every LSTM and gate parameter, over three updates of coordinates that fill
    two blocks and part of a third."""
    assert coordinate_lstm.applies(torch.zeros(1))  # it builds here
    torch.manual_seed(0)
    learner = LSTMMetaLearner(Conv4(hidden=4), 5, hidden_size=6)
    with torch.no_grad():  # gates that depend on their inputs, not only on their biases
        for gate in (learner.forget_gate, learner.input_gate):
            gate.weight.normal_(0, 0.5)
    n = 1300
    cell = torch.randn(n, requires_grad=True)
    grads = [torch.randn(n) * torch.randn(n).mul(3).exp() for _ in range(3)]  # the preprocessing's both branches
    weights = torch.rand(2 * 6 * n + 2 * n)  # h and c of the first layer, then the two gates

    def run() -> list[torch.Tensor]:
        c, state = cell, None
        for grad in grads:
            c, state = learner.update(c, grad, torch.tensor(0.8), state)
        (h, c1), forget, input_ = state
        outputs = torch.cat([c, h.flatten(), c1.flatten(), forget.flatten(), input_.flatten()])
        parameters = [cell, *learner.input_lstm.parameters(), *learner.forget_gate.parameters(),
                      *learner.input_gate.parameters()]
        return [outputs, *torch.autograd.grad((outputs[n:] * weights).sum() + c.square().sum(), parameters)]

    native = run()
    with coordinate_lstm.disabled():
        assert not coordinate_lstm.applies(torch.zeros(1))
        reference = run()
    for got, expected in zip(native, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_meta_gradient_reaches_the_initial_cell_state_and_the_lstm(glyphs):
    torch.manual_seed(0)
    learner = LSTMMetaLearner(Conv4(hidden=8), 5, inner_steps=3)
    meta_train_step(learner, batch(glyphs, size=2))
    for name, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # Conv biases feed BatchNorm, which removes them: their gradient is zero whatever the algorithm.
        if not (name.startswith("backbone") and name.endswith("bias")):
            assert p.grad.norm() > 0, f"{name} got no meta-gradient"


def test_learner_gradient_is_a_constant_of_the_meta_backward(glyphs):
    # Constant gates and one update: c_1 = f c_0 - i ∇L(c_0). With ∇ a constant, dL_query/dc_0 = f dL_query/dc_1;
    # differentiating through ∇ would add -i H dL_query/dc_1 (sizeable at i = 0.5).
    torch.manual_seed(0)
    learner = LSTMMetaLearner(Conv4(hidden=8), 5, inner_steps=1).double()
    set_gates(learner, forget=0.9, input_=0.5)
    tasks = batch(glyphs, size=1)
    tasks = dataclasses.replace(tasks, support_x=tasks.support_x.double(), query_x=tasks.query_x.double())
    task = next(iter(tasks))
    adapted = {name: p.detach().requires_grad_() for name, p in learner.adapt(task, training=True).items()}
    query_loss = F.cross_entropy(functional_forward(learner, adapted, task.query_x), task.query_y)
    expected = torch.autograd.grad(query_loss, list(adapted.values()))
    meta_train_step(learner, tasks)
    for (name, p), grad in zip(learner.learner_parameters().items(), expected):
        torch.testing.assert_close(p.grad, 0.9 * grad, msg=name)


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_evaluation_leaves_parameters_and_batchnorm_buffers_untouched(glyphs, bn_mode):
    torch.manual_seed(0)
    learner = LSTMMetaLearner(Conv4(hidden=8), 5, bn_mode=bn_mode, inner_steps=3)
    meta_train_step(learner, batch(glyphs))  # running statistics away from their initial values
    learner.zero_grad(set_to_none=True)
    saved = {name: value.clone() for name, value in learner.state_dict().items()}
    test_episode = episode(glyphs, split="test")
    accuracy = learner.evaluate_episode(test_episode)
    assert 0.0 <= accuracy <= 1.0 and learner.training
    for name, value in learner.state_dict().items():
        assert torch.equal(value, saved[name]), f"evaluation changed {name}"
    assert all(p.grad is None for p in learner.parameters())
    # Even with autograd on, evaluation builds no graph through the updates (memory flat in the steps).
    assert not learner.predict(test_episode, training=False).requires_grad


@pytest.mark.parametrize("kwargs", [dict(inner_steps=0), dict(test_inner_steps=-1), dict(hidden_size=0),
                                    dict(forget_bias=[6.0, 4.0]), dict(input_bias=[-4.0])])
def test_invalid_settings_raise_one_line_value_errors(kwargs):
    with pytest.raises(ValueError, match="algo\\.") as info:
        LSTMMetaLearner(Conv4(hidden=4), 5, **kwargs)
    assert "\n" not in str(info.value)


def test_config_builds_the_paper_settings():
    cfg = OmegaConf.load(metacli.cli.config_dir() / "algo" / "lstm_meta_learner.yaml")
    learner = instantiate(cfg, backbone=Conv4(hidden=4), n_way=5, bn_mode="running")
    assert isinstance(learner, LSTMMetaLearner) and learner.bn_mode == "running"
    assert (learner.inner_steps, learner.test_inner_steps, learner.input_lstm.hidden_size) == (12, 12, 20)
    assert 4.0 <= learner.forget_gate.bias.item() <= 6.0 and -5.0 <= learner.input_gate.bias.item() <= -4.0


def test_lstm_meta_learner_learns_synthetic_glyphs(glyphs):
    # Measured on CPU (1 thread, seed 0): 0.292 before, 0.582 after 25 steps of 4 tasks (seeds 1 and 2 with 30
    # steps: 0.375 -> 0.650 and 0.338 -> 0.597). No update at test time after training gives chance (0.21):
    # the gain is adaptation, with input gates that the meta-learner raised from 0.02 to 0.18 over the 5 updates.
    torch.manual_seed(0)
    learner = LSTMMetaLearner(Conv4(hidden=16), 5, inner_steps=5)
    before, after = meta_train(learner, glyphs, steps=25, meta_batch=4, lr=5e-3)
    assert_learned("LSTM meta-learner", before, after, at_least=0.45, gain=0.15)
