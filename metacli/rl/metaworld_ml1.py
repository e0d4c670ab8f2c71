"""Meta-World ML1 (Yu et al. 2019; the v3 package, "Meta-World+", 2025): one manipulation skill (``reach-v3``,
``push-v3``, ...) whose tasks are goal and object positions hidden from the observation; 50 training and 50 test
tasks fixed by the benchmark's seed. Here the last ``val_tasks`` training tasks are held out for validation.

The simulator runs in ``workers`` processes behind Gymnasium's ``AsyncVectorEnv``; each process steps a slice of
the sub-environments, and :class:`MetaWorldVectorEnv` presents them as one vector environment. Success is Meta-World's
own flag; an episode succeeds if the flag was raised at any step. Needs the ``rl`` extra: ``pip install -e ".[rl]"``.
"""
from __future__ import annotations

import atexit
import importlib

import gymnasium
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode

from metacli.errors import ConfigError
from metacli.rl.task_envs import TaskFamilyEnv

INSTALL = 'pip install -e ".[rl]"'


def _metaworld():
    try:
        return importlib.import_module("metaworld")
    except ImportError:
        raise ConfigError(f"env=metaworld_ml1 needs Meta-World, which is not installed: run {INSTALL} (metacli's rl "
                          "extra: metaworld 3.1.1 with mujoco 3.3.0)") from None


class MetaWorldML1(TaskFamilyEnv):
    """Args:
        task_name: the ML1 skill, e.g. ``reach-v3``.
        benchmark_seed: the seed Meta-World draws its 50 + 50 task variations with.
        val_tasks: training tasks held out for validation.
        reward_version: Meta-World's reward function, ``v2`` (the v3 package's default) or ``v1``.
        workers: simulator processes.
    """

    name = "metaworld_ml1"

    def __init__(self, task_name: str = "reach-v3", horizon: int = 150, trajectories: int = 10, gamma: float = 0.99,
                 benchmark_seed: int = 0, val_tasks: int = 10, reward_version: str = "v2", workers: int = 2) -> None:
        super().__init__(horizon, trajectories, gamma)
        metaworld = _metaworld()
        try:
            benchmark = metaworld.ML1(task_name, seed=benchmark_seed)
        except (KeyError, ValueError):
            raise ConfigError(f"env.task_name={task_name} is not a Meta-World v3 skill: give one such as reach-v3, "
                              "push-v3 or pick-place-v3") from None
        if not 0 < val_tasks < len(benchmark.train_tasks):
            raise ValueError(f"val_tasks={val_tasks}: hold out between 1 and {len(benchmark.train_tasks) - 1}")
        if reward_version not in ("v1", "v2"):
            raise ValueError(f"reward_version={reward_version!r}: choose v1 or v2")
        self.task_name, self.benchmark_seed, self.reward_version = task_name, benchmark_seed, reward_version
        self.workers = max(1, workers)
        self.split_tasks = {"train": benchmark.train_tasks[:-val_tasks], "val": benchmark.train_tasks[-val_tasks:],
                            "test": benchmark.test_tasks}
        probe = benchmark.train_classes[task_name]()
        self._observation_space, self._action_space = probe.observation_space, probe.action_space
        probe.close()
        self._envs: dict[tuple, MetaWorldVectorEnv] = {}

    @property
    def observation_space(self) -> gymnasium.Space:
        return self._observation_space

    @property
    def action_space(self) -> gymnasium.Space:
        return self._action_space

    def settings(self) -> dict:
        return {"task_name": self.task_name, "benchmark_seed": self.benchmark_seed,
                "reward_version": self.reward_version, "val_tasks": len(self.split_tasks["val"])}

    def sample_tasks(self, count: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """Indices into the split's tasks (offset by split, so that a batch knows which list they index):
        training draws with replacement, held-out splits go through their tasks in order, as often as needed."""
        size = len(self.split_tasks[split])
        if split == "train":
            index = torch.randint(0, size, (count,), generator=generator)
        else:
            index = torch.arange(count) % size
        return (index + 1000 * list(self.split_tasks).index(split)).view(-1, 1)

    def task(self, code: int):
        split = list(self.split_tasks)[code // 1000]
        return self.split_tasks[split][code % 1000]

    def vector_env(self, num_envs: int) -> "MetaWorldVectorEnv":
        """One set of worker processes a size, kept for the run (starting MuJoCo in a process takes seconds)."""
        if num_envs not in self._envs:
            self._envs[num_envs] = MetaWorldVectorEnv(self, num_envs)
        return self._envs[num_envs]

    def extra_metrics(self, rollout) -> dict[str, torch.Tensor]:
        """Each task's success rate: the share of its episodes in which Meta-World's success flag was raised."""
        flags = rollout.info["success"]  # [T, N, H]
        return {"success": (flags.amax(dim=2) > 0).float().mean(dim=1)}


class _EnvSlice(gymnasium.Env):
    """One worker's share of the sub-environments: ``count`` Meta-World environments stepped in turn. Its
    observation is their stacked observations; rewards and success flags travel in ``info``, since a Gymnasium
    environment's reward is a single number."""

    def __init__(self, task_name: str, count: int, first: int, reward_version: str) -> None:
        environments = _metaworld().env_dict.ALL_V3_ENVIRONMENTS
        self.envs = [environments[task_name](reward_function_version=reward_version) for _ in range(count)]
        for env in self.envs:
            env._partially_observable = True  # the goal is what a task hides
        self.first = first
        single = self.envs[0]
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (count, single.observation_space.shape[0]),
                                                      np.float64)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (count, single.action_space.shape[0]), np.float32)

    def reset(self, *, seed=None, options=None):
        if options and "tasks" in options:
            for index, env in enumerate(self.envs):
                env.set_task(options["tasks"][self.first + index])
        observations = [env.reset(seed=None if seed is None else seed + index)[0] for index, env in enumerate(self.envs)]
        return np.stack(observations), {}

    def step(self, actions):
        results = [env.step(action) for env, action in zip(self.envs, actions)]
        observations = np.stack([r[0] for r in results])
        info = {"rewards": np.array([r[1] for r in results], dtype=np.float32),
                "success": np.array([float(r[4].get("success", 0.0)) for r in results], dtype=np.float32)}
        return observations, 0.0, False, False, info


class MetaWorldVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` Meta-World sub-environments spread over the family's worker processes."""

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, family: MetaWorldML1, num_envs: int) -> None:
        self.family, self.num_envs = family, num_envs
        workers = min(family.workers, num_envs)
        sizes = [num_envs // workers + (i < num_envs % workers) for i in range(workers)]
        starts = np.cumsum([0] + sizes[:-1]).tolist()
        self.sizes = sizes
        self.single_observation_space, self.single_action_space = family.observation_space, family.action_space
        self.observation_space = gymnasium.vector.utils.batch_space(family.observation_space, num_envs)
        self.action_space = gymnasium.vector.utils.batch_space(family.action_space, num_envs)
        self.workers = AsyncVectorEnv(
            [lambda n=n, s=s: _EnvSlice(family.task_name, n, s, family.reward_version) for n, s in zip(sizes, starts)],
            shared_memory=False, autoreset_mode=AutoresetMode.DISABLED, observation_mode="different")
        atexit.register(self.close)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options and "tasks" in options:
            options = {"tasks": [self.family.task(int(code)) for code in torch.as_tensor(options["tasks"]).view(-1)]}
        # Worker i reseeds its environments from seed * 1000 + offset: every sub-environment gets its own seed.
        seeds = None if seed is None else [seed * 1000 + start for start in np.cumsum([0] + self.sizes[:-1])]
        observations, _ = self.workers.reset(seed=seeds, options=options)
        return self._join(observations), {}

    def step(self, actions):
        actions = np.asarray(torch.as_tensor(actions).clamp(-1, 1), dtype=np.float32)
        parts = np.split(actions, np.cumsum(self.sizes)[:-1])
        observations, _, _, _, info = self.workers.step(tuple(parts))
        rewards = np.concatenate(list(info["rewards"]))
        success = np.concatenate(list(info["success"]))
        never = np.zeros(self.num_envs, dtype=bool)
        return self._join(observations), rewards, never, never, {"success": success}

    def _join(self, observations) -> np.ndarray:
        return np.concatenate(list(observations)).astype(np.float32)

    def close(self, **kwargs) -> None:
        if not self.closed:
            self.workers.close()
            self.closed = True
