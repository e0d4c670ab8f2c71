"""Meta-World ML1 (Yu et al. 2019; the v3 package, "Meta-World+", 2025): one manipulation skill (``reach-v3``,
``push-v3``, ...) whose tasks are goal and object positions hidden from the observation; 50 training and 50 test
tasks fixed by the benchmark's seed. Here the last ``val_tasks`` training tasks of each skill are held out for
validation. ML10 (:mod:`metacli.rl.metaworld_ml10`) is the same family over ten training and five test skills.

The simulator runs in worker processes (:mod:`metacli.rl.process_vector_env`). Success is Meta-World's own flag;
an episode succeeds if the flag was raised at any step. Needs the ``rl`` extra: ``pip install -e ".[rl]"``.
"""
from __future__ import annotations

import functools
import itertools

import gymnasium
import torch

from metacli.errors import ConfigError
from metacli.rl.process_vector_env import ProcessTaskFamily, require

#: Held-out task codes are ``split_index * CODE_STRIDE + position`` in the split's list.
CODE_STRIDE = 1000


class MetaWorldML1(ProcessTaskFamily):
    """Args:
        task_name: the ML1 skill, e.g. ``reach-v3``.
        benchmark_seed: the seed Meta-World draws its task variations with.
        val_tasks: training tasks of each skill held out for validation.
        reward_version: Meta-World's reward function, ``v2`` (the v3 package's default) or ``v1``.
        workers: simulator processes.
    """

    name = "metaworld_ml1"
    info_keys = ("success",)

    def __init__(self, task_name: str = "reach-v3", horizon: int = 150, trajectories: int = 10, gamma: float = 0.99,
                 benchmark_seed: int = 0, val_tasks: int = 10, reward_version: str = "v2", workers: int = 2) -> None:
        super().__init__(horizon, trajectories, gamma, workers)
        if reward_version not in ("v1", "v2"):
            raise ValueError(f"reward_version={reward_version!r}: choose v1 or v2")
        self.task_name, self.benchmark_seed, self.reward_version = task_name, benchmark_seed, reward_version
        benchmark = self._benchmark(require("metaworld", self.name))
        self.skills = list(benchmark.train_classes) + [s for s in benchmark.test_classes
                                                        if s not in benchmark.train_classes]
        by_skill = {skill: [t for t in benchmark.train_tasks if t.env_name == skill] for skill in benchmark.train_classes}
        smallest = min(len(tasks) for tasks in by_skill.values())
        if not 0 < val_tasks < smallest:
            raise ValueError(f"val_tasks={val_tasks}: hold out between 1 and {smallest - 1} tasks of each skill")
        self.split_tasks = {"train": [t for tasks in by_skill.values() for t in tasks[:-val_tasks]],
                            "val": _interleave([tasks[-val_tasks:] for tasks in by_skill.values()]),
                            "test": _interleave([[t for t in benchmark.test_tasks if t.env_name == skill]
                                                 for skill in benchmark.test_classes])}
        self._take_spaces(benchmark.train_classes[self.skills[0]]())

    def _benchmark(self, metaworld):
        try:
            return metaworld.ML1(self.task_name, seed=self.benchmark_seed)
        except (KeyError, ValueError):
            raise ConfigError(f"env.task_name={self.task_name} is not a Meta-World v3 skill: give one such as "
                              "reach-v3, push-v3 or pick-place-v3") from None

    def settings(self) -> dict:
        return {"task_name": self.task_name, "benchmark_seed": self.benchmark_seed,
                "reward_version": self.reward_version, "val_tasks": len(self.split_tasks["val"])}

    def sample_tasks(self, count: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """Codes of the split's tasks (offset by split, so that a batch knows which list they index): training draws
        with replacement, held-out splits go through their tasks in order (each skill in turn), as often as needed."""
        size = len(self.split_tasks[split])
        if split == "train":
            index = torch.randint(0, size, (count,), generator=generator)
        else:
            index = torch.arange(count) % size
        return (index + CODE_STRIDE * list(self.split_tasks).index(split)).view(-1, 1)

    def task(self, code: torch.Tensor):
        split, position = divmod(int(code), CODE_STRIDE)
        return self.split_tasks[list(self.split_tasks)[split]][position]

    def env_factory(self):
        return functools.partial(_SkillSlot, tuple(self.skills), self.reward_version)

    def extra_metrics(self, rollout) -> dict[str, torch.Tensor]:
        """Each task's success rate: the share of its episodes in which Meta-World's success flag was raised."""
        flags = rollout.info["success"]  # [T, N, H]
        return {"success": (flags.amax(dim=2) > 0).float().mean(dim=1)}


def _interleave(groups: list[list]) -> list:
    """One of each group in turn, so that the first few held-out tasks cover every skill."""
    return [item for row in itertools.zip_longest(*groups) for item in row if item is not None]


class _SkillSlot(gymnasium.Env):
    """One sub-environment: the Meta-World environment of its current task's skill, built again when a task of
    another skill comes (an ML10 slot meets fifteen skills; keeping each one's MuJoCo scene, tens of megabytes, for
    every slot would fill the memory)."""

    def __init__(self, skills: tuple[str, ...], reward_version: str) -> None:
        self.reward_version, self.skill = reward_version, skills[0]
        self.env = self._build(self.skill)
        self.observation_space, self.action_space = self.env.observation_space, self.env.action_space

    def _build(self, name: str):
        env = require("metaworld", "metaworld").env_dict.ALL_V3_ENVIRONMENTS[name](
            reward_function_version=self.reward_version)
        env._partially_observable = True  # the goal is what a task hides
        return env

    def set_task(self, task) -> None:
        if task.env_name != self.skill:
            self.env.close()
            self.skill, self.env = task.env_name, self._build(task.env_name)
        self.env.set_task(task)

    def reset(self, *, seed=None, options=None):
        return self.env.reset(seed=seed)

    def step(self, action):
        return self.env.step(action)
