"""Memory-augmented neural network (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, "Meta-Learning with
Memory-Augmented Neural Networks", ICML 2016).

An episode is read as a sequence: each step's input is ``[embedding of x_t, one-hot label]``. In the paper the label
is ``y_{t-1}``, shown one step late (``label_lag=1``), so the network must predict each label before it sees it
and bind it to the previous input once it does. metacli's default shows each support image beside its own label
and the query beside none (``label_lag=0``), as a few-shot episode gives its support set. Every query gets its
own sequence (the support set in one order, then the query) and its logits are read at the last step. The support
steps are the same in all of an episode's sequences, so they run once and the memory after them is copied to each
query for its last step.

An LSTM controller drives an external memory ``M`` (``slots x width``, zero at the start of every sequence) through
``reads`` heads with least-recently-used access (LRUA). At step ``t``, for each head:

    write  w^w_t = σ(α_t) w^r_{t-1} + (1 − σ(α_t)) w^lu_{t-1}       (after erasing the least-used slots)
           M_t(i) = M_{t-1}(i) + w^w_t(i) a_t
    read   w^r_t(i) = softmax_i β cos(k_t, M_t(i)),   r_t = Σ_i w^r_t(i) M_t(i)
    usage  w^u_t = γ w^u_{t-1} + Σ_heads (w^r_t + w^w_t)
    w^lu_t = 1 on the ``reads`` smallest entries of w^u_t, else 0

so a head either updates the slot it last read or fills a fresh one. The logits are a linear map of ``[h_t, r_t]``.
The controller also receives the previous step's read vectors, as in the Neural Turing Machine, and the heads'
keys, write vectors and gates are read from ``[h_t, x_t]``, the controller state beside the step's input. In
meta-training all the tasks' sequences of a meta-batch run as one batch.

Deliberate differences from the paper (measured on synthetic glyphs, 5-way 1-shot):

* Images are embedded by the configured backbone (trained jointly, support and query in one forward), not fed as
  raw pixels.
* The read softmax scales the cosine by a key strength β (``key_strength``, as in the Neural Turing Machine's
  content addressing; the paper's is 1). Over many slots a softmax of values in [-1, 1] is nearly uniform, so a
  read cannot single out a slot: on a toy task with clean embeddings a small MANN was still at chance after 6000
  episodes with β=1 and took off after ~3500 with β=10; on glyphs β=5 and β=20 learned slower than 10.
* The paper writes the read key ``k_t`` itself; here each head emits a separate write vector ``a_t``, initialised
  to the key's projection (so it starts as the paper's tied write). The key must look up the current input while
  the write binds the previous input to the label just revealed. On glyphs (fixed embedding, 16 tasks a step) this
  reached 0.5 training accuracy in 1000 steps (2 seeds); the tied write was at 0.23-0.26 after 1500, an
  independently initialised write vector at 0.20 and 0.36.
* The heads read the step's input ``x_t`` (embedding and label) beside the controller state ``h_t``; the paper's
  read only ``h_t``. Through the LSTM alone a key resembles the current image only once training has made it so,
  and until then the network sits at chance for as long as that takes: on real Omniglot (defaults otherwise,
  1,500 steps of 16 tasks) seeds 0 and 2 left chance by step 500 and 250 (87.79 ± 0.79 % and 91.46 ± 0.61 %),
  seed 1 never did (20.22 ± 0.75 %, and still at chance after 750 steps with β=30 or a learning rate of 3e-3).
  With the input beside the state, seeds 0 and 1 validated at 91.1 % and 89.7 % after 250 steps and tested at
  96.41 ± 0.36 % and 95.34 ± 0.43 % after 1,500 (``metacli train algo=mann dataset=omniglot seed=0``, ``seed=1``;
  about 12 minutes each on one thread).
* With several heads the paper gives every head the same ``reads`` least-used slots and erases one of them; here
  head ``i`` takes the ``i``-th least-used slot, and all of those are erased, so the heads fill distinct, empty
  slots instead of adding their vectors onto the same ones.
* Labels beside their images (``label_lag=0``, the default). With the paper's late labels the network sits at
  chance until it has learned to bind each input to the label that follows it, which on real Omniglot took longer
  than any budget tried: with 16 tasks a step (seed 0), 5-shot training episodes with the support steps' loss
  were at chance after 500 steps (val 19.9 %), 2-shot ones after 1,500 (test 20.00 ± 0.07 %); earlier, 8 tasks a
  step had left chance in 1,200 steps for one seed (49.97 ± 1.61 %) and not in 2,000 for another. With each label
  beside its image a query only has to find the support step it matches: the same network (16 tasks a step, 1-shot
  episodes with 5 queries a class, seed 0) validated at 70.0 % after 500 steps and tested at 87.79 ± 0.79 % after
  1,500. The paper's form stays available:
  ``algo.label_lag=1 algo.support_loss_weight=1.0 task.train_shot=5 task.train_query=1``, where the loss adds the
  support steps' cross-entropy (each label predicted before it is shown) and 5-shot training episodes show every
  class several times, as the paper's sequences do.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.sequences import check_way, labelled_steps, support_order
from metacli.algorithms.similarity import cosine_similarity
from metacli.data.episodes import Episode, EpisodeBatch


class MemoryState(NamedTuple):
    """Everything carried from one step to the next, for a batch of ``B`` sequences."""

    lstm: tuple[torch.Tensor, torch.Tensor]  # controller (h, c): [B, hidden] each
    memory: torch.Tensor  # M: [B, slots, width]
    usage: torch.Tensor  # w^u: [B, slots]
    read_weights: torch.Tensor  # w^r: [B, heads, slots]
    reads: torch.Tensor  # r: [B, heads * width]


def repeat_state(state: MemoryState, counts: torch.Tensor) -> MemoryState:
    """Sequence ``i``'s state copied ``counts[i]`` times, one branch per query that continues it."""
    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(counts, dim=0)

    h, c = state.lstm
    return MemoryState((repeat(h), repeat(c)), *(repeat(tensor) for tensor in state[1:]))


def least_used(usage: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, heads, slots]``: row ``i`` is the one-hot of the ``i``-th least-used slot (ties: lower index first).

    Summed over the heads it is the paper's w^lu: 1 on the ``heads`` smallest usages, 0 elsewhere.
    """
    order = torch.sort(usage, dim=-1, stable=True).indices[..., :heads]
    return F.one_hot(order, usage.shape[-1]).to(usage.dtype)


def lrua_write(memory: torch.Tensor, usage: torch.Tensor, previous_read: torch.Tensor, gate: torch.Tensor,
               vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase the least-used slots, then add each head's vector where its gate sends it.

    Args:
        memory: ``[B, slots, width]``; usage: ``[B, slots]`` (w^u_{t-1}); previous_read: ``[B, heads, slots]``
            (w^r_{t-1}); gate: ``[B, heads]`` logits α (σ(α)=1: the previously read slot, 0: the least-used one);
            vectors: ``[B, heads, width]`` (a_t).

    Returns:
        the new memory and the write weights w^w_t ``[B, heads, slots]``.
    """
    least = least_used(usage, previous_read.shape[1])
    keep = torch.sigmoid(gate).unsqueeze(-1)
    weights = keep * previous_read + (1 - keep) * least
    erased = memory * (1 - least.sum(dim=1)).unsqueeze(-1)
    return erased + weights.transpose(1, 2) @ vectors, weights


def lrua_read(memory: torch.Tensor, keys: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Content-based read: ``[B, heads, width]`` read vectors and ``[B, heads, slots]`` weights, the softmax over
    slots of ``strength`` x the cosine similarity of each head's key to each slot."""
    weights = torch.softmax(strength * cosine_similarity(keys, memory), dim=-1)
    return weights @ memory, weights


class MemoryAugmentedCell(nn.Module):
    """One step of an LSTM controller with an LRUA memory: ``([B, input_size], state) -> ([B, out_dim], state)``.

    The output is ``[h_t, r_t]`` (controller state and read vectors), for the caller's own output layer.
    """

    def __init__(self, input_size: int, hidden_size: int, slots: int, width: int, heads: int, decay: float,
                 key_strength: float) -> None:
        super().__init__()
        self.slots, self.width, self.heads = slots, width, heads
        self.decay, self.key_strength = decay, key_strength
        self.controller = nn.LSTMCell(input_size + heads * width, hidden_size)
        # Per head: read key k_t, write vector a_t, write gate α_t, from the controller state and the step's input.
        self.interface = nn.Linear(hidden_size + input_size, heads * (2 * width + 1))
        with torch.no_grad():
            # The write vector starts as the key's projection (the paper's tied write), so a step reads back what
            # it has just written; training then lets the two part.
            for param in (self.interface.weight, self.interface.bias):
                per_head = param.view(heads, 2 * width + 1, -1)
                per_head[:, width:2 * width] = per_head[:, :width]
        self.out_dim = hidden_size + heads * width

    def initial_state(self, batch: int, like: torch.Tensor) -> MemoryState:
        """An empty memory (all zeros, unused), no previous read, zero controller state."""
        zeros = like.new_zeros
        hidden = self.controller.hidden_size
        return MemoryState(lstm=(zeros(batch, hidden), zeros(batch, hidden)),
                           memory=zeros(batch, self.slots, self.width), usage=zeros(batch, self.slots),
                           read_weights=zeros(batch, self.heads, self.slots),
                           reads=zeros(batch, self.heads * self.width))

    def forward(self, inputs: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
        h, c = self.controller(torch.cat([inputs, state.reads], dim=1), state.lstm)
        # The step's input beside the controller state: a key can look the current image up from the first step.
        interface = self.interface(torch.cat([h, inputs], dim=1))
        keys, vectors, gate = interface.view(-1, self.heads, 2 * self.width + 1).split([self.width, self.width, 1],
                                                                                       dim=-1)
        # tanh keeps what is stored bounded, whatever the controller's scale; the key's scale is irrelevant to cosine.
        memory, write_weights = lrua_write(state.memory, state.usage, state.read_weights, gate.squeeze(-1),
                                           torch.tanh(vectors))
        reads, read_weights = lrua_read(memory, keys, self.key_strength)
        usage = self.decay * state.usage + read_weights.sum(dim=1) + write_weights.sum(dim=1)
        reads = reads.flatten(1)
        return torch.cat([h, reads], dim=1), MemoryState((h, c), memory, usage, read_weights, reads)


class MANN(FewShotLearner):
    """Memory-augmented neural network with least-recently-used access.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        hidden_size: LSTM controller units.
        memory_slots, memory_width: shape of the external memory.
        reads: read heads (each also writes), and the number of least-used slots.
        usage_decay: γ, how fast the usage of a slot that is no longer accessed fades.
        key_strength: β, the scale of the cosine similarities before the read softmax (1 is the paper's).
        support_loss_weight: weight of the support steps' cross-entropy added to the query loss in training.
        label_lag: 1 shows each support label one step late, as the paper (each predicted before it is shown); 0
            shows it beside its own image, as the support set of a few-shot episode is given, and the query with
            no label. With lag 0 a support step's own label is in its input, so its loss must be 0.
    """

    fixed_way = True
    # The recurrence costs its number of steps whatever the batch: a meta-batch runs as one batch of sequences.
    training_step = "whole_batch"

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", hidden_size: int = 200,
                 memory_slots: int = 128, memory_width: int = 40, reads: int = 4, usage_decay: float = 0.95,
                 key_strength: float = 10.0, support_loss_weight: float = 0.0, label_lag: int = 1) -> None:
        super().__init__(backbone, n_way, bn_mode)
        for key, value in (("hidden_size", hidden_size), ("memory_slots", memory_slots),
                           ("memory_width", memory_width), ("reads", reads)):
            if value < 1:
                raise ValueError(f"algo.{key} must be a positive integer, got {value}")
        if reads > memory_slots:
            raise ValueError(f"algo.reads must be at most algo.memory_slots ({memory_slots}), got {reads}")
        if not 0 <= usage_decay <= 1:
            raise ValueError(f"algo.usage_decay must be in [0, 1], got {usage_decay}")
        if key_strength <= 0:
            raise ValueError(f"algo.key_strength must be > 0, got {key_strength}")
        if support_loss_weight < 0:
            raise ValueError(f"algo.support_loss_weight must be >= 0, got {support_loss_weight}")
        if label_lag not in (0, 1):
            raise ValueError(f"algo.label_lag must be 0 or 1, got {label_lag}")
        if label_lag == 0 and support_loss_weight > 0:
            raise ValueError("algo.label_lag=0 shows each support label with its image, so there is nothing to "
                             "predict at support steps: set algo.support_loss_weight=0")
        self.cell = MemoryAugmentedCell(backbone.out_dim + n_way, hidden_size, memory_slots, memory_width, reads,
                                        usage_decay, key_strength)
        self.output = nn.Linear(self.cell.out_dim, n_way)
        self.support_loss_weight, self.label_lag = support_loss_weight, label_lag

    def steps(self, episode: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The support steps ``[S, D+n_way]``, the query steps ``[Q, D+n_way]`` and the support labels in the order
        the steps show them (support step ``t`` is to predict ``labels[t]``, a query step its query's label).

        Every query's sequence is the same support steps followed by its own step, which carries the last support
        label (shown one step late).
        """
        check_way(episode.n_way, self.n_way)
        n_support = episode.support_x.shape[0]
        # One forward for support and query, so transductive BatchNorm sees the whole episode.
        embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        order = support_order(n_support, training, embeddings.device)
        labels = episode.support_y[order]
        support_steps, query_steps = labelled_steps(embeddings[:n_support][order], labels, embeddings[n_support:],
                                                    self.n_way, self.label_lag)
        return support_steps, query_steps, labels

    def unroll(self, inputs: torch.Tensor, state: MemoryState | None = None) -> tuple[torch.Tensor, MemoryState]:
        """``[B, T, n_way]`` logits at every step of ``[B, T, D]`` inputs, from ``state`` (default: a fresh,
        empty memory per sequence), and the state after the last step."""
        if state is None:
            state = self.cell.initial_state(inputs.shape[0], inputs)
        features = []
        for step in inputs.unbind(dim=1):
            out, state = self.cell(step, state)
            features.append(out)
        return self.output(torch.stack(features, dim=1)), state

    def episode_logits(self, episodes: list[Episode], training: bool
                       ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(support logits [S, n_way], query logits [Q, n_way], support labels)`` of each episode.

        The support steps are common to all of an episode's query sequences, so they run once per episode (the
        episodes of a meta-batch together) and the memory after them is copied to each query for its last step:
        the same outputs as one full sequence per query, at a fraction of the cost.
        """
        support_steps, query_steps, labels = zip(*(self.steps(episode, training) for episode in episodes))
        support_logits, state = self.unroll(torch.stack(support_steps))
        counts = torch.tensor([len(q) for q in query_steps], device=support_logits.device)
        query_logits = self.unroll(torch.cat(query_steps).unsqueeze(1), repeat_state(state, counts))[0][:, 0]
        return list(zip(support_logits, query_logits.split(counts.tolist()), labels))

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        return self.episode_logits([episode], training)[0][1]

    def episode_losses(self, episodes: list[Episode], training: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Loss and query accuracy of each episode, all of them run as one batch: the recurrence costs its number
        of steps whatever the batch, so a meta-batch costs about as much as one episode."""
        return [self.loss(support, query, labels, episode)
                for (support, query, labels), episode in zip(self.episode_logits(episodes, training), episodes)]

    def loss(self, support_logits: torch.Tensor, query_logits: torch.Tensor, support_y: torch.Tensor,
             episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy, plus the weighted cross-entropy of the support steps, and query accuracy."""
        loss = F.cross_entropy(query_logits, episode.query_y)
        if self.support_loss_weight > 0:
            loss = loss + self.support_loss_weight * F.cross_entropy(support_logits, support_y)
        return loss, (query_logits.argmax(dim=1) == episode.query_y).float().mean()

    def task_loss(self, episode: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.episode_losses([episode], training)[0]

    def batch_loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(map(torch.stack, zip(*self.episode_losses(list(batch), training=True))))
