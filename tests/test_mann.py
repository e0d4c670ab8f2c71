"""MANN: least-recently-used memory access (reads, least-used slots, gated writes, usage), the label offset of its
sequences, a fresh memory per sequence, its loss, evaluation without trace, constructor checks, its config, and
learning on synthetic glyphs."""
from __future__ import annotations

import hydra
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metacli.cli
from metacli.algorithms.mann import MANN, MemoryAugmentedCell, least_used, lrua_read, lrua_write
from metacli.build import build_dataset, build_learner
from metacli.config_schema import register
from metacli.data.episodes import Episode
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step, task_by_task

from learning import assert_evaluation_leaves_no_trace, assert_learned, batch, episode, meta_train, train_a_little

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"hidden_size": 16, "memory_slots": 8, "memory_width": 6, "reads": 2}


def small_mann(**kwargs) -> MANN:
    return MANN(Conv4(hidden=8), 5, **{**SMALL, **kwargs})


def evaluation_logits(learner: MANN, ep: Episode) -> torch.Tensor:
    with torch.no_grad(), learner.evaluation_mode():
        return learner.predict(ep, training=False)


# ---------------------------------------------------------------- memory access


def test_read_weights_are_a_softmax_over_slots_of_the_scaled_cosine():
    torch.manual_seed(0)
    memory, keys = torch.randn(3, 8, 6), torch.randn(3, 2, 6)
    reads, weights = lrua_read(memory, keys, strength=4.0)
    assert reads.shape == (3, 2, 6) and weights.shape == (3, 2, 8)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(3, 2))
    cosine = F.cosine_similarity(keys.unsqueeze(2), memory.unsqueeze(1), dim=-1)
    assert torch.allclose(weights, torch.softmax(4.0 * cosine, dim=-1), atol=1e-6)
    assert torch.allclose(reads, torch.einsum("bhs,bsw->bhw", weights, memory), atol=1e-6)
    # A key pointing at one slot (any scale) reads mostly that slot, more so with a larger strength.
    key = 5.0 * memory[:, 3:4]
    sharp, blunt = lrua_read(memory, key, 20.0)[1], lrua_read(memory, key, 1.0)[1]
    assert (sharp.argmax(dim=-1) == 3).all() and (sharp[..., 3] > blunt[..., 3]).all()


def test_least_used_picks_the_lowest_usage_slots_one_per_head():
    usage = torch.tensor([[0.9, 0.1, 0.5, 0.0, 0.3],
                          [0.0, 0.0, 2.0, 0.0, 1.0]])  # ties go to the lower index
    least = least_used(usage, heads=2)
    assert least.shape == (2, 2, 5)
    assert least.argmax(dim=-1).tolist() == [[3, 1], [0, 1]]
    assert torch.equal(least.sum(dim=-1), torch.ones(2, 2))
    # Summed over heads: the paper's w^lu, 1 on the `reads` smallest usages.
    assert least.sum(dim=1).tolist() == [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]]


@pytest.mark.parametrize("gate,expected_slot", [(30.0, 2), (-30.0, 0)])
def test_write_goes_to_the_previously_read_or_the_least_used_slot(gate, expected_slot):
    memory = torch.arange(1.0, 13.0).view(1, 4, 3)  # every slot holds something
    usage = torch.tensor([[0.1, 0.7, 0.9, 0.5]])  # slot 0 is least used
    previous_read = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]])  # slot 2 was read at the previous step
    vector = torch.tensor([[[10.0, 20.0, 30.0]]])
    new_memory, weights = lrua_write(memory, usage, previous_read, torch.tensor([[gate]]), vector)
    assert torch.allclose(weights[0, 0], F.one_hot(torch.tensor(expected_slot), 4).float(), atol=1e-6)
    expected = memory.clone()
    expected[0, 0] = 0.0  # the least-used slot is erased before writing, whatever the gate
    expected[0, expected_slot] += vector[0, 0]
    assert torch.allclose(new_memory, expected, atol=1e-5)


def test_a_cell_step_starts_from_an_empty_memory_and_accumulates_usage():
    torch.manual_seed(0)
    cell = MemoryAugmentedCell(input_size=5, hidden_size=7, slots=6, width=4, heads=2, decay=0.9, key_strength=3.0)
    state = cell.initial_state(3, torch.zeros(()))
    assert not state.memory.any() and not state.usage.any() and not state.read_weights.any()
    keys, vectors = cell.interface.weight.view(2, 9, 7 + 5).split([4, 4, 1], dim=1)[:2]  # reads [h, input]
    assert torch.equal(keys, vectors), "the write vector starts as the key (the paper's tied write)"
    out, state = cell(torch.randn(3, 5), state)
    assert out.shape == (3, cell.out_dim) == (3, 7 + 2 * 4)
    assert state.memory.any()
    for _ in range(3):
        previous = state
        _, state = cell(torch.randn(3, 5), previous)
        assert torch.allclose(state.read_weights.sum(dim=-1), torch.ones(3, 2))
        # w^u_t = γ w^u_{t-1} + Σ_heads (w^r_t + w^w_t); once the previous reads sum to 1, so do each head's write
        # weights (σ w^r_{t-1} + (1 - σ) w^lu_{t-1}), hence the total usage grows by 2 heads x (1 + 1).
        assert torch.allclose(state.usage.sum(dim=-1), 0.9 * previous.usage.sum(dim=-1) + 4, atol=1e-5)


# ---------------------------------------------------------------- sequences


def full_sequences(learner: MANN, ep: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's form: ``[Q, S+1, D+n_way]``, one whole sequence per query, and the support labels in order."""
    support_steps, query_steps, labels = learner.steps(ep, training)
    n_query = len(query_steps)
    return torch.cat([support_steps.expand(n_query, -1, -1), query_steps.unsqueeze(1)], dim=1), labels


def test_output_shapes(glyphs):
    torch.manual_seed(0)
    learner = small_mann()
    ep = episode(glyphs, seed=1, k_shot=2, n_query=3)
    support_steps, query_steps, labels = learner.steps(ep, training=True)
    assert support_steps.shape == (10, learner.backbone.out_dim + 5)
    assert query_steps.shape == (15, learner.backbone.out_dim + 5)
    assert sorted(labels.tolist()) == sorted(ep.support_y.tolist())
    support, query, _ = learner.episode_logits([ep], training=True)[0]
    assert support.shape == (10, 5) and query.shape == (15, 5)
    assert learner.predict(ep, training=True).shape == (15, 5)
    assert evaluation_logits(learner, ep).shape == (15, 5)


def test_each_step_sees_its_input_and_the_previous_label(glyphs):
    """The label is offset by one step: the first step sees none, a query step the last support label."""
    torch.manual_seed(0)
    learner = small_mann()
    ep = episode(glyphs, seed=2, k_shot=2, n_query=1)
    torch.manual_seed(1)
    sequences, labels = full_sequences(learner, ep, training=True)
    shown = sequences[..., -5:]
    previous = torch.cat([torch.zeros(1, 5), F.one_hot(labels, 5).float()])  # nothing, y_0, ..., y_{S-1}
    assert torch.equal(shown, previous.expand_as(shown))
    # A query step carries the query's own embedding; a support step its support image's, in the shown order.
    embeddings = learner.backbone(torch.cat([ep.support_x, ep.query_x]))
    assert torch.allclose(sequences[:, -1, :-5], embeddings[10:], atol=1e-5)
    by_label = {label: embeddings[:10][ep.support_y == label] for label in range(5)}
    for step, label in zip(sequences[0, :-1, :-5], labels.tolist()):
        assert any(torch.allclose(step, candidate, atol=1e-5) for candidate in by_label[label])
    # What the cell receives: the support steps once, then every query step.
    inputs = []
    hook = learner.cell.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    torch.manual_seed(1)
    learner.episode_logits([ep], training=True)
    hook.remove()
    assert [tuple(i.shape) for i in inputs] == [(1, sequences.shape[-1])] * 10 + [(5, sequences.shape[-1])]
    assert torch.allclose(torch.cat(inputs[:10]), sequences[0, :-1], atol=1e-6)
    assert torch.allclose(inputs[-1], sequences[:, -1], atol=1e-6)


def test_with_no_lag_each_support_step_shows_its_own_label_and_a_query_none(glyphs):
    torch.manual_seed(0)
    learner = small_mann(label_lag=0)
    ep = episode(glyphs, seed=2, k_shot=2, n_query=1)
    sequences, labels = full_sequences(learner, ep, training=True)
    shown = sequences[..., -5:]
    own = torch.cat([F.one_hot(labels, 5).float(), torch.zeros(1, 5)])  # y_0, ..., y_{S-1}, nothing
    assert torch.equal(shown, own.expand_as(shown))
    embeddings = learner.backbone(torch.cat([ep.support_x, ep.query_x]))
    by_label = {label: embeddings[:10][ep.support_y == label] for label in range(5)}
    for step, label in zip(sequences[0, :-1, :-5], labels.tolist()):
        assert any(torch.allclose(step, candidate, atol=1e-5) for candidate in by_label[label])


def test_running_the_support_once_equals_a_whole_sequence_per_query(glyphs):
    torch.manual_seed(0)
    learner = train_a_little(small_mann(), glyphs)
    ep = episode(glyphs, seed=9, k_shot=2, n_query=4)
    with torch.no_grad():
        sequences, _ = full_sequences(learner, ep, training=False)
        whole = learner.unroll(sequences)[0]
        support, query, _ = learner.episode_logits([ep], training=False)[0]
    assert torch.allclose(query, whole[:, -1], atol=1e-5)
    assert torch.allclose(support, whole[0, :-1], atol=1e-5)


def test_memory_is_fresh_for_every_sequence():
    torch.manual_seed(0)
    learner = small_mann()
    sequences = torch.randn(4, 6, learner.backbone.out_dim + 5)
    sequences[2] = sequences[0]
    with torch.no_grad():
        logits = learner.unroll(sequences)[0]
        assert torch.equal(logits[0], logits[2]), "identical sequences in one batch must give identical outputs"
        assert not torch.allclose(logits[0], logits[1])
        alone = torch.cat([learner.unroll(sequences[i:i + 1])[0] for i in range(4)])
        assert torch.allclose(logits, alone, atol=1e-6), "a sequence's output must not depend on the others"
        assert torch.equal(learner.unroll(sequences)[0], logits), "nothing may be carried from one call to the next"


def test_a_query_is_classified_independently_of_the_other_queries(glyphs):
    torch.manual_seed(0)
    learner = train_a_little(small_mann(bn_mode="running"), glyphs)
    ep = episode(glyphs, seed=3, split="test")
    keep = torch.tensor([0, 7, 19])
    fewer = Episode(ep.support_x, ep.support_y, ep.query_x[keep], ep.query_y[keep], ep.n_way)
    assert torch.allclose(evaluation_logits(learner, fewer), evaluation_logits(learner, ep)[keep], atol=1e-5)


def test_query_logits_depend_on_the_support_labels(glyphs):
    torch.manual_seed(0)
    learner = small_mann()
    ep = episode(glyphs, seed=4, split="test")
    relabelled = Episode(ep.support_x, (ep.support_y + 1) % 5, ep.query_x, ep.query_y, ep.n_way)
    assert not torch.allclose(evaluation_logits(learner, ep), evaluation_logits(learner, relabelled), atol=1e-4)


def test_support_order_is_shuffled_in_training_only(glyphs):
    torch.manual_seed(0)
    learner = small_mann()
    ep = episode(glyphs, seed=5, k_shot=3)
    orders = {tuple(learner.steps(ep, training=True)[2].tolist()) for _ in range(5)}
    assert len(orders) > 1
    with torch.no_grad():
        assert torch.equal(learner.steps(ep, training=False)[2], ep.support_y)


# ---------------------------------------------------------------- loss and gradients


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_loss_is_the_query_cross_entropy_plus_the_weighted_support_steps(glyphs, weight):
    torch.manual_seed(0)
    learner = small_mann(support_loss_weight=weight)
    ep = episode(glyphs, seed=6, k_shot=2, n_query=2)
    torch.manual_seed(1)
    loss, accuracy = learner.task_loss(ep, training=True)
    torch.manual_seed(1)  # the same support order
    sequences, labels = full_sequences(learner, ep, training=True)
    logits = learner.unroll(sequences)[0]
    query = F.cross_entropy(logits[:, -1], ep.query_y)
    support = torch.stack([F.cross_entropy(logits[q, :-1], labels) for q in range(10)]).mean()
    assert loss.item() == pytest.approx((query + weight * support).item(), rel=1e-5)
    assert accuracy.item() == (logits[:, -1].argmax(dim=1) == ep.query_y).float().mean().item()


def test_gradients_reach_every_parameter(glyphs):
    torch.manual_seed(0)
    learner = small_mann()
    metrics = meta_train_step(learner, batch(glyphs))
    assert torch.isfinite(torch.tensor(metrics["loss"])) and 0 <= metrics["accuracy"] <= 1
    for name, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_meta_batch_in_one_run_matches_task_by_task(glyphs):
    """The meta-batch's sequences run together: same losses and gradients as the task-by-task backward."""
    torch.manual_seed(0)
    learner = small_mann(support_loss_weight=0.5)
    meta_batch = batch(glyphs, size=3, seed=8)

    def gradients() -> list[torch.Tensor]:
        return [p.grad.clone() for p in learner.parameters()]

    learner.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same support orders in both runs
    batched = meta_train_step(learner, meta_batch)
    batched_grads = gradients()
    learner.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    losses, accuracies = task_by_task(learner, meta_batch)
    single_grads = gradients()
    assert batched["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert batched["accuracy"] == accuracies.mean().item()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(batched_grads, single_grads))


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
def test_evaluation_is_deterministic_and_leaves_no_trace(glyphs, bn_mode):
    torch.manual_seed(0)
    learner = train_a_little(small_mann(bn_mode=bn_mode), glyphs)
    assert_evaluation_leaves_no_trace(learner, episode(glyphs, seed=7, split="test"))


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("key,value", [("hidden_size", 0), ("memory_slots", 0), ("memory_width", 0), ("reads", 0),
                                       ("reads", 9), ("usage_decay", -0.1), ("usage_decay", 1.5),
                                       ("key_strength", 0.0), ("support_loss_weight", -1.0), ("label_lag", 2)])
def test_invalid_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=f"algo.{key}"):
        small_mann(**{key: value})
    # With each label beside its image a support step has nothing to predict.
    with pytest.raises(ValueError, match="algo.support_loss_weight=0"):
        small_mann(label_lag=0, support_loss_weight=0.5)


def test_the_config_builds_the_learner():
    register()
    with hydra.initialize_config_dir(config_dir=str(metacli.cli.config_dir()), version_base="1.3"):
        cfg = hydra.compose(config_name="train", overrides=["algo=mann", "algo.reads=2", "backbone.hidden=8",
                                                             "dataset=synthetic", "task.n_way=4"])
    learner = build_learner(cfg, build_dataset(cfg))
    assert isinstance(learner, MANN) and learner.fixed_way and learner.n_way == 4
    assert learner.cell.heads == 2 and learner.cell.slots == cfg.algo.memory_slots
    assert learner.cell.controller.hidden_size == cfg.algo.hidden_size
    assert learner.cell.controller.input_size == 8 + 4 + 2 * cfg.algo.memory_width  # embedding, label, reads
    assert learner.cell.interface.in_features == cfg.algo.hidden_size + 8 + 4  # controller state, the step's input
    assert learner.output.out_features == 4
    # Labels beside their images, so no support loss; episodes of the task's shot with five queries a class, 16 a step.
    assert (learner.label_lag, learner.support_loss_weight) == (cfg.algo.label_lag, cfg.algo.support_loss_weight)
    assert (cfg.algo.label_lag, cfg.algo.support_loss_weight) == (0, 0)
    assert (cfg.task.train_shot, cfg.task.train_query, cfg.trainer.meta_batch) == (None, 5, 16)


# ---------------------------------------------------------------- learning


class PooledPixels(nn.Module):
    """A fixed embedding: the image's 7x7 average pools (16 values; nearest prototype on them scores ~0.5)."""

    out_dim = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 7).flatten(1)


def test_mann_learns_synthetic_glyphs(glyphs):
    # With the label shown one step late, the network must learn to bind each input to the label that follows it,
    # and sits at chance until it does: with a Conv4 trained jointly that takes hundreds of meta-steps (minutes on
    # one thread), so this test embeds with fixed pooled pixels and times the memory's learning alone (the
    # backbone's gradient is tested above), on 1-shot episodes and the query loss. Measured on CPU (1 thread,
    # seed 0): 0.200 before, 0.383 after 1000 steps of 16 tasks, in about 20 s.
    torch.manual_seed(0)
    learner = MANN(PooledPixels(), 5, hidden_size=64, memory_slots=8, memory_width=16, reads=1,
                   support_loss_weight=0.0)
    before, after = meta_train(learner, glyphs, steps=1000, meta_batch=16, lr=1e-3)
    assert_learned("MANN", before, after, at_least=0.35, gain=0.12)


def test_mann_with_labels_beside_their_images_learns_synthetic_glyphs(glyphs):
    # The default: a query is matched against support steps that carry their own labels, so there is no binding to
    # learn first. Measured on CPU (1 thread), the same small network as above: 0.20 before, 0.48 after 300
    # steps of 16 tasks, in about 6 s (seeds 1 and 2: 0.48 and 0.49).
    torch.manual_seed(0)
    learner = MANN(PooledPixels(), 5, hidden_size=64, memory_slots=8, memory_width=16, reads=1, label_lag=0)
    before, after = meta_train(learner, glyphs, steps=300, meta_batch=16, lr=1e-3)
    assert_learned("MANN", before, after, at_least=0.35, gain=0.12)


def test_an_episode_of_another_way_is_refused_with_a_clear_error(glyphs):
    learner = small_mann()
    for n_way in (3, 6):
        with pytest.raises(ValueError, match=f"built 5-way and cannot read a {n_way}-way"):
            learner.predict(episode(glyphs, n_way=n_way), training=False)
