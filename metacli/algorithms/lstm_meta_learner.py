"""The LSTM meta-learner (Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017).

The learner is the backbone plus a linear ``n_way`` head. Its parameters, flattened into one vector, are the cell
state of a coordinate-wise LSTM: each coordinate is one row of a batch, and all rows share the LSTM's weights.
Each of the ``inner_steps`` updates reads the learner's support loss and gradient at ``θ_{t-1} = c_{t-1}`` and
writes ``c_t = f_t ⊙ c_{t-1} − i_t ⊙ ∇_t``, where

    i_t = σ(W_I · [h_t, θ_{t-1}, i_{t-1}] + b_I),    f_t = σ(W_F · [h_t, θ_{t-1}, f_{t-1}] + b_F)

and ``h_t`` is the output of a first, ordinary coordinate-wise LSTM over the preprocessed ``(∇_t, L_t)`` (the
authors' implementation; it stands for ``[∇_t, L_t]`` in the paper's equations). ``b_F`` starts large (the
parameters are kept) and ``b_I`` small (a small learning rate). The initial cell state ``c_0`` is the learner's
own parameters, meta-learned with the LSTM from the query loss after the last update.

As in the paper, the learner's loss and gradient are inputs treated as constants in the meta-backward: each update
differentiates the support loss at a detached copy of ``c_{t-1}``, so there are no second-order terms.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.inner_loop import Params, functional_forward, support_loss
from metacli.data.episodes import Episode
from metacli.models.kernels import coordinate_lstm

#: Preprocessing constant of Andrychowicz et al. (2016), as the paper uses it.
P = 10.0


def preprocess(x: torch.Tensor, p: float = P) -> torch.Tensor:
    """``x -> (log|x| / p, sign x)`` where ``|x| >= e^-p``, else ``(-1, e^p x)``, in a new trailing dimension of 2.

    Gradients and losses span many orders of magnitude: the first feature carries the scale, the second the sign.
    """
    # Clamping at e^-p makes the log feature exactly -1 on the small branch.
    scale = x.abs().clamp_min(math.exp(-p)).log() / p
    return torch.stack([scale, torch.where(x.abs() >= math.exp(-p), x.sign(), math.exp(p) * x)], dim=-1)


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([p.flatten() for p in params.values()])


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    """Cut ``flat`` into tensors named and shaped as ``like``."""
    chunks = flat.split([p.numel() for p in like.values()])
    return {name: chunk.view(p.shape) for (name, p), chunk in zip(like.items(), chunks)}


class LSTMMetaLearner(FewShotLearner):
    """The LSTM meta-learner.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        inner_steps: LSTM updates of the learner on the support set during meta-training (each on the whole set).
        test_inner_steps: updates at evaluation (``None``: as in training; the gates were learned for that many).
        hidden_size: width of the first, coordinate-wise LSTM layer.
        forget_bias, input_bias: ``[low, high]`` of the uniform initialisation of ``b_F`` and ``b_I``.
    """

    fixed_way = True
    parallel_tasks = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", inner_steps: int = 12,
                 test_inner_steps: int | None = None, hidden_size: int = 20,
                 forget_bias: tuple[float, float] = (4.0, 6.0), input_bias: tuple[float, float] = (-5.0, -4.0)) -> None:
        super().__init__(backbone, n_way, bn_mode)
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        if inner_steps < 1 or test_inner_steps < 0 or hidden_size < 1:
            raise ValueError(f"the LSTM meta-learner needs algo.inner_steps>=1, algo.test_inner_steps>=0 and "
                             f"algo.hidden_size>=1; got {inner_steps}, {test_inner_steps} and {hidden_size}")
        for key, bounds in (("forget_bias", forget_bias), ("input_bias", input_bias)):
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ValueError(f"algo.{key} must be a [low, high] range with low <= high, got {list(bounds)}")
        self.head = nn.Linear(backbone.out_dim, n_way)
        # Per coordinate: preprocessed gradient and loss in, h_t out.
        self.input_lstm = nn.LSTMCell(4, hidden_size)
        # Gates read [h_t, θ_{t-1}, previous gate].
        self.forget_gate = nn.Linear(hidden_size + 2, 1)
        self.input_gate = nn.Linear(hidden_size + 2, 1)
        for gate, (low, high) in ((self.forget_gate, forget_bias), (self.input_gate, input_bias)):
            nn.init.uniform_(gate.weight, -0.01, 0.01)
            nn.init.uniform_(gate.bias, low, high)
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def learner_parameters(self) -> Params:
        """The learner's parameters (backbone and head): the LSTM's initial cell state ``c_0``."""
        return {**dict(self.backbone.named_parameters(prefix="backbone")),
                **dict(self.head.named_parameters(prefix="head"))}

    def learner_loss_and_gradient(self, cell: torch.Tensor, like: Params, x: torch.Tensor,
                                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The learner's loss on ``(x, y)`` at ``θ = cell`` and its gradient, both constants for the meta-backward."""
        with torch.enable_grad():
            theta = cell.detach().requires_grad_()
            loss = support_loss(self, unflatten(theta, like), x, y, self.family)
            (grad,) = torch.autograd.grad(loss, theta)
        return loss.detach(), grad

    def update(self, cell: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: tuple | None = None):
        """One step ``c_t = f_t ⊙ c_{t-1} − i_t ⊙ ∇_t``: returns ``c_t`` and the recurrent state for the next one.

        ``state`` holds the first layer's ``(h, c)`` and the previous gates; ``None`` at the first step (zeros).
        The state keeps the coordinates along its last dimension (``[hidden, n]``), so each gate's values are one
        contiguous block: ``nn.LSTMCell`` applies its activations in place to strided column slices of a
        ``[n, 4 * hidden]`` tensor, which the CPU runs unvectorised, several times slower. The maths is the cell's,
        with its parameters.
        """
        lstm, n = self.input_lstm, cell.shape[0]
        # The loss is one value for all coordinates: its input weights act as one more bias.
        shared = lstm.weight_ih[:, 2:] @ preprocess(loss) + lstm.bias_ih + lstm.bias_hh
        if state is None:
            zeros = cell.new_zeros(1, n)
            state = ((None, None), zeros, zeros)
        (h, c), forget, input_ = state
        if coordinate_lstm.applies(cell, grad, shared):
            cell, h, c, forget, input_ = coordinate_lstm.update(
                preprocess(grad).T, grad, cell, h, c, forget.view(-1), input_.view(-1), shared,
                lstm.weight_ih[:, :2], lstm.weight_hh, self.forget_gate.weight.view(-1), self.forget_gate.bias,
                self.input_gate.weight.view(-1), self.input_gate.bias)
            return cell, ((h, c), forget.unsqueeze(0), input_.unsqueeze(0))
        gates = torch.addmm(shared.unsqueeze(1), lstm.weight_ih[:, :2], preprocess(grad).T)
        if h is not None:
            gates = torch.addmm(gates, lstm.weight_hh, h)
        in_gate, forget_gate, candidate, out_gate = gates.chunk(4)
        c = torch.sigmoid(in_gate) * torch.tanh(candidate) + (0 if c is None else torch.sigmoid(forget_gate) * c)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        theta = cell.unsqueeze(0)
        forget = torch.sigmoid(self._gate(self.forget_gate, h, theta, forget))
        input_ = torch.sigmoid(self._gate(self.input_gate, h, theta, input_))
        return forget.squeeze(0) * cell - input_.squeeze(0) * grad, ((h, c), forget, input_)

    @staticmethod
    def _gate(gate: nn.Linear, h: torch.Tensor, theta: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """``gate([h, θ, previous])`` for ``[hidden, n]`` and ``[1, n]`` inputs, as ``[1, n]``."""
        hidden = h.shape[0]
        weight = gate.weight
        return torch.addmm(gate.bias.unsqueeze(1) + weight[:, hidden:hidden + 1] * theta
                           + weight[:, hidden + 1:] * previous, weight[:, :hidden], h)

    def adapt(self, episode: Episode, training: bool) -> Params:
        """The learner's parameters after the LSTM's updates on ``episode``'s support set."""
        like = self.learner_parameters()
        cell, state = flatten(like), None
        # Nothing is back-propagated at evaluation: build no graph, so memory stays flat in the number of steps.
        with contextlib.nullcontext() if training else torch.no_grad():
            for _ in range(self.inner_steps if training else self.test_inner_steps):
                loss, grad = self.learner_loss_and_gradient(cell, like, episode.support_x, episode.support_y)
                cell, state = self.update(cell, grad, loss, state)
        return unflatten(cell, like)

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        return functional_forward(self, self.adapt(episode, training), episode.query_x)
