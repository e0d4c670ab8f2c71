"""Meta-reinforcement learning: the task families step as the papers describe behind Gymnasium's vector API, held-out
tasks stay fixed, the bandit references rank as theory says, the policy-gradient pieces compute what they claim, a
meta-RL run resumes exactly after SIGKILL, and bad input gets one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import gymnasium
import pytest
import torch

from conftest import assert_one_line_error, metacli_command, run_cli
from metacli.algorithms.maml_rl import MAMLRL
from metacli.models.mlp import MLP
from metacli.rl.advantages import discounted_returns, generalized_advantages, linear_feature_baseline
from metacli.rl.bandit import BernoulliBandits
from metacli.rl.point_nav import PointNavigation
from metacli.rl.task_envs import FixedTasks, TaskBatch
from metacli.rl.trpo import conjugate_gradient


def test_point_navigation_steps_as_the_paper_describes():
    family = PointNavigation()
    env = family.vector_env(3)
    assert isinstance(env, gymnasium.vector.VectorEnv) and env.num_envs == 3
    assert env.single_action_space.shape == (2,) and env.action_space.shape == (3, 2)
    goals = torch.tensor([[0.3, -0.2], [0.0, 0.0], [-0.5, 0.5]])
    observations, _ = env.reset(seed=0, options={"tasks": goals})
    assert torch.equal(observations, torch.zeros(3, 2))
    observations, rewards, terminated, truncated, _ = env.step(torch.tensor([[1.0, -1.0], [0.05, 0.0], [0.0, 0.0]]))
    assert torch.allclose(observations, torch.tensor([[0.1, -0.1], [0.05, 0.0], [0.0, 0.0]]))  # clipped to ±0.1
    assert torch.allclose(rewards, -(observations - goals).norm(dim=1))
    assert not terminated.any() and not truncated.any()
    goals = family.sample_tasks(2000, torch.Generator().manual_seed(0))
    assert goals.min() >= -0.5 and goals.max() <= 0.5 and goals.min() < -0.49 and goals.max() > 0.49


def test_held_out_tasks_are_fixed_whatever_the_batch_and_splits_differ():
    family = PointNavigation()
    test = FixedTasks(family, "test")
    whole = torch.cat([b.tasks for b in test.fixed(30, seed=0, batch_size=30)])
    pieces = torch.cat([b.tasks for b in test.fixed(30, seed=0, batch_size=7)])
    val = torch.cat([b.tasks for b in FixedTasks(family, "val").fixed(30, seed=0, batch_size=30)])
    assert torch.equal(whole, pieces) and not torch.equal(whole, val)
    assert family.content_sha256("test") != family.content_sha256("val")


def test_bandit_rewards_follow_the_arms_and_the_references_rank_as_theory_says():
    family = BernoulliBandits(arms=5, horizon=100)
    env = family.vector_env(4000)
    env.reset(seed=0, options={"tasks": torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.5]]).repeat(4000, 1)})
    _, low, *_ = env.step(torch.zeros(4000, dtype=torch.long))
    _, high, *_ = env.step(torch.ones(4000, dtype=torch.long))
    assert abs(low.mean().item() - 0.1) < 0.02 and abs(high.mean().item() - 0.9) < 0.02
    batch = next(FixedTasks(family, "test").fixed(400, seed=0, batch_size=400))
    regret = {name: values.mean().item() for name, values in family.references(batch).items()}
    # A random policy's expected regret is n (E[max of 5 uniforms] - 1/2) = 100 (5/6 - 1/2) = 33.3.
    assert abs(regret["random"] - 100 / 3) < 2.5
    assert regret["thompson_sampling"] < 0.7 * regret["ucb1"] and regret["ucb1"] < 0.7 * regret["random"]
    again = family.references(batch)
    assert again["thompson_sampling"].mean().item() == regret["thompson_sampling"]  # same seeds, same pulls


def test_returns_baseline_and_advantages():
    rewards = torch.tensor([[[1.0, 0.0, 2.0]]])
    assert torch.allclose(discounted_returns(rewards, 0.5), torch.tensor([[[1.5, 1.0, 2.0]]]))
    values = torch.tensor([[[0.3, -0.2, 0.7]]])
    assert torch.allclose(generalized_advantages(rewards, values, 0.5, 1.0), discounted_returns(rewards, 0.5) - values)
    # The linear feature baseline explains more than half the variance of point navigation's returns (random policy).
    family = PointNavigation()
    batch = TaskBatch(family, family.sample_tasks(8, torch.Generator().manual_seed(1)), seed=3)
    torch.manual_seed(0)  # the policy's initialisation: the same trajectories every run
    learner = MAMLRL(MLP(2, None, [16]), family.observation_space, family.action_space)
    sampled = learner.sample(batch, learner.policy.parameters_dict(), False, torch.Generator().manual_seed(0))
    returns = discounted_returns(sampled.rewards, family.gamma)
    residual = returns - linear_feature_baseline(sampled.observations, returns)
    assert residual.var() < 0.5 * returns.var()


def test_conjugate_gradient_solves_a_positive_definite_system():
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = a @ a.T + torch.eye(6, dtype=torch.float64)
    b = torch.arange(6, dtype=torch.float64)
    assert torch.allclose(conjugate_gradient(lambda v: a @ v, b, iterations=20), torch.linalg.solve(a, b))


@pytest.fixture(scope="module")
def learner_and_batch():
    torch.manual_seed(0)
    family = PointNavigation(horizon=30, trajectories=6)
    learner = MAMLRL(MLP(2, None, [16, 16]), family.observation_space, family.action_space)
    return learner, TaskBatch(family, family.sample_tasks(4, torch.Generator().manual_seed(2)), seed=5)


def test_one_backward_pass_gives_each_task_its_own_inner_gradient(learner_and_batch):
    learner, batch = learner_and_batch
    params = {k: v.detach().requires_grad_() for k, v in learner.policy.parameters_dict().items()}
    sampled = learner.sample(batch, params, False, torch.Generator().manual_seed(0))
    together = learner.adapt(params, sampled, per_task=False, create_graph=False)
    for task in range(len(batch)):
        alone = learner.adapt(params, _task(sampled, task), per_task=False, create_graph=False)
        for name in params:
            assert torch.allclose(together[name][task], alone[name][0], atol=1e-6)


def _task(sampled, index):
    """One task's trajectories as a rollout of its own."""
    keep = slice(index, index + 1)
    return type(sampled)(sampled.tasks[keep], sampled.observations[keep], sampled.actions[keep],
                         sampled.rewards[keep], None, sampled.gamma)


@pytest.mark.parametrize("curvature", ["inner_loop", "adapted"])
def test_the_trpo_step_stays_in_its_trust_region_and_improves_the_surrogate(learner_and_batch, curvature):
    learner, batch = learner_and_batch
    learner.curvature = curvature
    before = [p.detach().clone() for p in learner.policy.parameters()]
    metrics = learner.meta_update(batch)
    moved = any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters()))
    assert metrics["step_fraction"] > 0 and moved
    assert 0 < metrics["kl"] <= learner.trust_region["max_kl"]


def test_rollouts_repeat_with_their_seed():
    family = BernoulliBandits(arms=3, horizon=10)
    batch = TaskBatch(family, family.sample_tasks(5, torch.Generator().manual_seed(0)), seed=11)
    from metacli.algorithms.rl2 import RL2
    learner = RL2(family.observation_space, family.action_space, hidden=8)
    first, second = (learner._trials(batch, batch.generator()) for _ in range(2))
    assert torch.equal(first.actions, second.actions) and torch.equal(first.rewards, second.rewards)
    # The recurrent policy's step-by-step distributions are those of one pass over the whole trial.
    distribution, _, _ = learner.policy(learner._sequence_inputs(first))
    assert torch.allclose(distribution.logits, first.behaviour.logits.reshape(distribution.logits.shape), atol=1e-5)


# ---------------------------------------------------------------- the command line

SMOKE = ["experiment=smoke_rl", "trainer.steps=12", "trainer.val_every=6", "trainer.checkpoint_every=1",
         "trainer.log_every=1", "logger=jsonl"]


def test_a_killed_meta_rl_run_resumes_to_the_same_rows_and_results(tmp_path):
    reference = tmp_path / "reference"
    done = run_cli("train", *SMOKE, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "killed"
    process = subprocess.Popen([metacli_command(), "train", *SMOKE, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.monotonic() + 300
    while not _rows_past(run_dir, 4):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    resumed = run_cli("train", *SMOKE, "trainer.resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("metrics.jsonl", "results.json"):
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name
    results = json.loads((reference / "results.json").read_text())
    stages = results["stages"]
    assert [s["stage"] for s in stages] == ["before adaptation", "after 1 step", "after 2 steps", "after 3 steps"]
    assert results["return"] == stages[-1]["return"]["return"] and results["ci95"] == stages[-1]["return"]["ci95"]


def _rows_past(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return any(json.loads(line)["step"] > step for line in text[:text.rfind("\n") + 1].splitlines())


# ---------------------------------------------------------------- learning, at small scale


def _train(tmp_path: Path, name: str, *overrides: str) -> dict:
    done = run_cli("train", *overrides, "trainer.progress=false", "trainer.plots=false", "logger=none",
                   f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / name / "results.json").read_text())


def _stage(results: dict, name: str) -> tuple[float, float]:
    stage = next(s for s in results["stages"] if s["stage"] == name)
    return stage["return"]["return"], stage["return"]["ci95"]


def test_maml_rl_learns_to_adapt_to_new_goals(tmp_path):
    # Small: 10 goals a meta-batch, 10 trajectories a goal, 15 TRPO steps; 40 fixed test goals.
    shape = ["env=point_nav", "env.trajectories=10", "trainer.meta_batch=10", "trainer.val_every=15",
             "trainer.val_episodes=10", "eval.episodes=40", "eval.batch_size=20"]
    trained = _train(tmp_path, "maml", *shape, "algo.test_inner_steps=1", "trainer.steps=15")
    untrained = _train(tmp_path, "init", *shape, "algo.test_inner_steps=1", "trainer.steps=0")
    floor = _train(tmp_path, "random", *shape, "algo=random_policy")
    before, before_ci = _stage(trained, "before adaptation")
    after, after_ci = _stage(trained, "after 1 step")
    # Adapting helps, the adapted policy beats the random floor and the untrained initialisation's adaptation, all
    # by more than both CIs.
    assert after - after_ci > before + before_ci
    assert after - after_ci > floor["return"] + floor["ci95"]
    assert after - after_ci > untrained["return"] + untrained["ci95"]


def test_rl2_learns_to_explore_bandits(tmp_path):
    # 5 arms, trials of 20 pulls, 60 PPO updates; 200 fixed test bandits.
    shape = ["env=bandit", "env.horizon=20", "trainer.meta_batch=100", "trainer.val_every=60",
             "trainer.val_episodes=50", "eval.episodes=200", "eval.batch_size=100"]
    trained = _train(tmp_path, "rl2", *shape, "trainer.steps=60")
    regret, ci = trained["stages"][-1]["regret"]["regret"], trained["stages"][-1]["regret"]["ci95"]
    random = trained["references"]["random"]
    # Below a random policy's regret on the same bandits, by more than both CIs.
    assert regret + ci < random["regret"] - random["ci95"]


# ---------------------------------------------------------------- Meta-World (the rl extra)


def test_metaworld_ml1_steps_through_worker_processes_with_its_splits():
    from metacli.rl.metaworld_ml1 import MetaWorldML1
    family = MetaWorldML1(horizon=10, trajectories=2, workers=2)
    assert [len(family.split_tasks[s]) for s in ("train", "val", "test")] == [40, 10, 50]
    test = next(FixedTasks(family, "test").fixed(3, seed=0, batch_size=3))
    assert [family.task(int(c)) for c in test.tasks.view(-1)] == family.split_tasks["test"][:3]
    env = family.vector_env(6)
    assert isinstance(env, gymnasium.vector.VectorEnv) and env.num_envs == 6
    observations, _ = env.reset(seed=4, options={"tasks": test.tasks.repeat_interleave(2, dim=0)})
    assert observations.shape == (6, 39)
    observations, rewards, *_, info = env.step(torch.zeros(6, 4))
    assert observations.shape == (6, 39) and rewards.shape == (6,) and info["success"].shape == (6,)
    # The same seed, the same tasks: the same transitions, from fresh processes too.
    again = MetaWorldML1(horizon=10, trajectories=2, workers=3).vector_env(6)
    first, _ = again.reset(seed=4, options={"tasks": test.tasks.repeat_interleave(2, dim=0)})
    second, repeated_rewards, *_ = again.step(torch.zeros(6, 4))
    assert (second == observations).all() and (repeated_rewards == rewards).all()
    again.close()


def test_a_missing_rl_extra_is_one_line(tmp_path):
    # Meta-World made unimportable in the CLI's own process, as in an install without the extra.
    code = ("import sys; sys.modules['metaworld'] = None; from metacli.cli import main; "
            "sys.argv = ['metacli', 'train', 'env=metaworld_ml1', 'hydra.run.dir=run']; main()")
    done = subprocess.run([str(Path(metacli_command()).with_name("python")), "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(done, 'pip install -e ".[rl]"')


def test_metaworld_ml10_holds_out_skills_and_switches_a_slot_between_them():
    from metacli.rl.metaworld_ml10 import MetaWorldML10
    family = MetaWorldML10(horizon=10, trajectories=1, workers=2)
    train, val, test = (family.split_tasks[s] for s in ("train", "val", "test"))
    assert [len(train), len(val), len(test)] == [450, 50, 250]
    train_skills = {t.env_name for t in train}
    assert len(train_skills) == 10 and {t.env_name for t in val} == train_skills
    assert not train_skills & {t.env_name for t in test}
    # Held-out tasks take each skill in turn: the first five test tasks are the five test skills.
    assert len({t.env_name for t in test[:5]}) == 5
    env = family.vector_env(2)
    for split in ("train", "test"):  # each sub-environment meets a new skill
        tasks = family.sample_tasks(2, torch.Generator().manual_seed(3), split)
        observations, _ = env.reset(seed=1, options={"tasks": tasks})
        observations, rewards, *_, info = env.step(torch.zeros(2, 4))
        assert observations.shape == (2, 39) and rewards.shape == (2,) and info["success"].shape == (2,)


def test_half_cheetah_rewards_its_target_and_repeats_with_its_seed():
    from metacli.rl.half_cheetah import HalfCheetah, _make_cheetah
    action = torch.full((6,), 0.5).numpy()
    for kind, target in (("velocity", 1.5), ("direction", -1.0)):
        env = _make_cheetah(kind, 0.05)
        env.set_task(target)
        env.reset(seed=0)
        _, reward, *_, info = env.step(action)
        velocity = info["x_velocity"]
        progress = -abs(velocity - target) if kind == "velocity" else target * velocity
        assert reward == pytest.approx(progress - 0.05 * 6 * 0.25)
        assert env.observation_space.shape == (17,)  # the x position, which would reveal the speed, is left out
    family = HalfCheetah(horizon=5, trajectories=2, workers=2)
    velocities = family.sample_tasks(2000, torch.Generator().manual_seed(0))
    assert velocities.min() >= 0 and velocities.max() <= 2 and velocities.min() < 0.01 and velocities.max() > 1.99
    directions = HalfCheetah(kind="direction").sample_tasks(200, torch.Generator().manual_seed(0))
    assert set(directions.view(-1).tolist()) == {-1.0, 1.0}
    tasks = velocities[:3].repeat_interleave(2, dim=0)
    steps = []
    for workers in (2, 3):  # the same seed and tasks: the same transitions, however the processes split them
        env = HalfCheetah(horizon=5, trajectories=2, workers=workers).vector_env(6)
        first, _ = env.reset(seed=7, options={"tasks": tasks})
        steps.append((first, *env.step(torch.full((6, 6), 0.3))[:2]))
        env.close()
    assert all((a == b).all() for a, b in zip(*steps))
    assert steps[0][2].shape == (6,) and len(set(steps[0][2].tolist())) > 1
