"""TADAM and task maps: the conditioning starts as the identity and changes the network only through its gates, the
running statistics of a step with many forwards are the native ones, the auxiliary share decays as the paper's
schedule, a run resumes exactly, TADAM learns on real Omniglot, its task map knows the alphabets, and bad input is
one line."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli, straight_and_resumed
from metacli.algorithms.protonet import ProtoNet
from metacli.algorithms.tadam import TADAM
from metacli.data.augment import RandomAffine
from metacli.data.batches import CoTrainingBatch, LabelledBatch
from metacli.data.episodes import Episode, EpisodeBatch
from metacli.models.batchnorm import statistics_folded_after
from metacli.models.conv4 import Conv4
from metacli.task_map import purity


def episode(generator: torch.Generator) -> Episode:
    return Episode(torch.randn(5, 1, 28, 28, generator=generator), torch.arange(5),
                   torch.randn(10, 1, 28, 28, generator=generator), torch.arange(5).repeat(2), 5)


def test_conditioning_starts_as_protonet_and_moves_through_its_gates():
    torch.manual_seed(0)
    tadam = TADAM(Conv4(1, 28, hidden=8), 5, auxiliary_batch=0)
    protonet = ProtoNet(tadam.backbone, 5)
    task = episode(torch.Generator().manual_seed(1))
    with tadam.evaluation_mode():
        start = tadam.predict(task, training=False)
        assert torch.allclose(start, protonet.predict(task, training=False), atol=1e-5)
        with torch.no_grad():
            tadam.task_network.scale_gates.fill_(0.5)
            tadam.task_network.shift_gates.fill_(0.5)
        conditioned = tadam.predict(task, training=False)
        other = episode(torch.Generator().manual_seed(2))
        # The same queries under another task's conditioning: the backbone depends on the task now.
        swapped = tadam.predict(Episode(other.support_x, task.support_y, task.query_x, task.query_y, 5), False)
    assert not torch.allclose(conditioned, start, atol=1e-3)
    assert not torch.allclose(conditioned, swapped, atol=1e-3)
    # The FiLM hooks live only inside a forward: the backbone is left as it was.
    assert not any(m._forward_hooks for m in tadam.backbone.modules())
    losses, _ = tadam.batch_loss(EpisodeBatch(*(t.unsqueeze(0) for t in (task.support_x, task.support_y,
                                                                         task.query_x, task.query_y)), 5))
    losses.sum().backward()
    assert tadam.log_scale.grad != 0 and tadam.task_network.predictors[0][0].weight.grad.abs().sum() > 0


def test_statistics_folded_after_are_the_native_updates():
    torch.manual_seed(0)
    native, folded = Conv4(1, 28, hidden=8), Conv4(1, 28, hidden=8)
    folded.load_state_dict(native.state_dict())
    batches = [torch.randn(n, 1, 28, 28) for n in (5, 12, 7)]
    for x in batches:
        native(x)
    with statistics_folded_after(folded):
        outputs = [folded(x) for x in batches]
    torch.stack([o.sum() for o in outputs]).sum().backward()  # three forwards of each layer, one backward
    for (name, a), b in zip(native.state_dict().items(), folded.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_the_auxiliary_share_decays_as_the_papers_schedule():
    tadam = TADAM(Conv4(1, 28, hidden=8), 5, n_classes=10, total_steps=100)
    shares = []
    for step in (0, 4, 5, 50, 99):
        tadam.steps_done.fill_(step)
        shares.append(tadam.auxiliary_weight())
    assert shares == pytest.approx([1.0, 1.0, 0.9, 0.9 ** 10, 0.9 ** 19])
    assert "steps_done" in tadam.state_dict()  # saved with the weights: a resumed run continues the schedule


def test_augment_distorts_both_parts_of_a_co_training_batch():
    generator = torch.Generator().manual_seed(0)
    task = episode(generator)
    batch = CoTrainingBatch(EpisodeBatch(*(t.unsqueeze(0) for t in (task.support_x, task.support_y, task.query_x,
                                                                     task.query_y)), 5),
                            LabelledBatch(torch.randn(6, 1, 28, 28, generator=generator), torch.arange(6), 10))
    distorted = RandomAffine()(batch, generator)
    for before, after in ((batch.episodes.support_x, distorted.episodes.support_x),
                          (batch.episodes.query_x, distorted.episodes.query_x), (batch.labelled.x, distorted.labelled.x)):
        assert after.shape == before.shape and not torch.allclose(after, before)
    assert torch.equal(distorted.labelled.y, batch.labelled.y)


def test_purity_tells_grouped_from_scattered_embeddings():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(20)
    grouped = purity(labels.double().unsqueeze(1) * 10 + torch.randn(120, 1, generator=generator), labels, 200, 0)
    scattered = purity(torch.randn(120, 4, generator=generator, dtype=torch.float64), labels, 200, 0)
    assert grouped["purity"] > 0.95 and grouped["shuffled"]["range95"][1] < 0.35 and grouped["shuffled"]["p_value"] < 0.01
    assert scattered["purity"] - scattered["ci95"] < scattered["shuffled"]["range95"][1]


def test_a_tadam_run_resumes_exactly(tmp_path):
    # total_steps fixed: it follows trainer.steps, which the 4-step first part would shorten.
    common = ["experiment=smoke", "algo=tadam", "backbone.hidden=16", "algo.auxiliary_batch=16",
              "algo.total_steps=8", "augment=affine", "trainer.val_every=4", "trainer.checkpoint_every=2"]
    first, second, _ = straight_and_resumed(common, tmp_path)
    assert first["episode_scores"] == second["episode_scores"]
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any(0 < row.get("train/auxiliary_weight", 1) < 1 for row in rows)


def test_tadam_learns_on_real_omniglot_and_its_task_map_knows_the_alphabets(omniglot_root, tmp_path):
    run = tmp_path / "tadam"
    done = run_cli("train", "algo=tadam", "dataset=omniglot", f"dataset.root={omniglot_root}", "device=cpu",
                   "trainer.steps=60", "trainer.meta_batch=2", "trainer.val_every=60", "trainer.val_episodes=20",
                   "eval.episodes=100", "trainer.progress=false", "trainer.plots=false", f"hydra.run.dir={run}",
                   cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "results.json").read_text())
    # 5-way chance is 20 %; measured 78.3 ± 2.3 % after 60 steps.
    assert results["accuracy"] - results["ci95"] > 0.6, results
    done = run_cli("embed-tasks", str(run), "--episodes", "200", "--shuffles", "200", cwd=tmp_path,
                   env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    scored = json.loads((run / "task_map.json").read_text())
    # Episodes of one alphabet lie together: measured 67.0 ± 6.5 % against 8.3 % with the labels shuffled.
    assert scored["purity"] - scored["ci95"] > scored["shuffled"]["range95"][1] + 0.2, scored
    assert scored["episodes"] == 200 and scored["alphabets"] > 5
    assert (run / "task_map.png").stat().st_size > 20_000 and "purity" in done.stdout


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maml")
    done = run_cli("train", "experiment=smoke", "algo=maml", "trainer.steps=2", f"hydra.run.dir={folder / 'run'}",
                   cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "run"


@pytest.mark.parametrize("args, needle", [
    (["RUN"], "MAML has no representation to embed tasks with"),
    (["RUN", "--episodes", "2"], "use at least 3 episodes"),
    (["NOWHERE"], "is not a metacli run dir"),
])
def test_bad_task_maps_are_one_line(args, needle, synthetic_run, tmp_path):
    args = [str(synthetic_run) if a == "RUN" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    assert_one_line_error(run_cli("embed-tasks", *args, cwd=tmp_path), needle)


def test_a_synthetic_run_has_no_alphabets_to_map(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "experiment=smoke", "algo=tadam", "backbone.hidden=8", "trainer.steps=2",
                   f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    assert_one_line_error(run_cli("embed-tasks", str(run), cwd=tmp_path), "synthetic's test split has 0 alphabet(s)")
    assert_one_line_error(run_cli("train", "experiment=smoke", "algo=tadam", "algo.scale=0",
                                  f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path), "scale must be > 0")
