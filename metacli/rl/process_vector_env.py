"""Task families whose simulator is MuJoCo (Meta-World, half-cheetah): each worker process of Gymnasium's
``AsyncVectorEnv`` steps a slice of the sub-environments in turn, and :class:`ProcessVectorEnv` presents the slices
as one vector environment. Sub-environments are Gymnasium environments with a ``set_task(task)`` method."""
from __future__ import annotations

import atexit
import importlib
from abc import abstractmethod
from typing import Any, Callable

import gymnasium
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode

from metacli.errors import ConfigError
from metacli.rl.task_envs import TaskFamilyEnv

INSTALL = 'pip install -e ".[rl]"'


def require(module: str, env: str):
    """Import an optional simulator package, or stop with one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"env={env} needs {module}, which is not installed: run {INSTALL} (metacli's rl extra: "
                          "metaworld 3.1.1 with mujoco 3.3.0)") from None


class ProcessTaskFamily(TaskFamilyEnv):
    """A task family stepped in ``workers`` processes. Subclasses say how a worker builds one sub-environment
    (:meth:`env_factory`, picklable), what a task code means to it (:meth:`task`), and which per-step ``info``
    numbers travel back (``info_keys``, e.g. Meta-World's success flag)."""

    info_keys: tuple[str, ...] = ()

    def __init__(self, horizon: int, trajectories: int, gamma: float, workers: int) -> None:
        super().__init__(horizon, trajectories, gamma)
        self.workers = max(1, workers)
        self._envs: dict[int, ProcessVectorEnv] = {}

    def _take_spaces(self, probe: gymnasium.Env) -> None:
        """Take a sub-environment's spaces from ``probe``, one built in this process, and close it."""
        self._observation_space, self._action_space = probe.observation_space, probe.action_space
        probe.close()

    @property
    def observation_space(self) -> gymnasium.Space:
        return self._observation_space

    @property
    def action_space(self) -> gymnasium.Space:
        return self._action_space

    @abstractmethod
    def env_factory(self) -> Callable[[], gymnasium.Env]:
        """A picklable callable that builds one sub-environment in a worker process."""

    @abstractmethod
    def task(self, code: torch.Tensor) -> Any:
        """What ``set_task`` of a sub-environment takes, from one row of :meth:`sample_tasks`'s tensor."""

    def vector_env(self, num_envs: int) -> "ProcessVectorEnv":
        """One set of worker processes a size, kept for the run (starting MuJoCo in a process takes seconds)."""
        if num_envs not in self._envs:
            self._envs[num_envs] = ProcessVectorEnv(self, num_envs)
        return self._envs[num_envs]


class _EnvSlice(gymnasium.Env):
    """One worker's share of the sub-environments: ``count`` environments stepped in turn. Its observation is their
    stacked observations; rewards and the ``info_keys`` numbers travel in ``info``, since a Gymnasium environment's
    reward is a single number."""

    def __init__(self, make_env: Callable[[], gymnasium.Env], count: int, first: int,
                 info_keys: tuple[str, ...]) -> None:
        self.envs = [make_env() for _ in range(count)]
        self.first, self.info_keys = first, info_keys
        single = self.envs[0]
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (count, single.observation_space.shape[0]),
                                                      np.float64)
        self.action_space = gymnasium.spaces.Box(-np.inf, np.inf, (count, single.action_space.shape[0]), np.float32)

    def reset(self, *, seed=None, options=None):
        if options and "tasks" in options:
            for index, env in enumerate(self.envs):
                env.set_task(options["tasks"][self.first + index])
        observations = [env.reset(seed=None if seed is None else seed + index)[0] for index, env in enumerate(self.envs)]
        return np.stack(observations), {}

    def step(self, actions):
        results = [env.step(action) for env, action in zip(self.envs, actions)]
        info = {"rewards": np.array([r[1] for r in results], dtype=np.float32)}
        for key in self.info_keys:
            info[key] = np.array([float(r[4].get(key, 0.0)) for r in results], dtype=np.float32)
        return np.stack([r[0] for r in results]), 0.0, False, False, info


class ProcessVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` sub-environments of ``family`` spread over its worker processes. Episodes have a fixed length,
    so autoreset is off; ``reset(seed=s)`` reseeds sub-environment ``j`` of worker ``i`` with ``s * 1000 + j`` plus
    the worker's offset, so every sub-environment has its own seed."""

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, family: ProcessTaskFamily, num_envs: int) -> None:
        self.family, self.num_envs = family, num_envs
        workers = min(family.workers, num_envs)
        self.sizes = [num_envs // workers + (i < num_envs % workers) for i in range(workers)]
        self.starts = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.single_observation_space, self.single_action_space = family.observation_space, family.action_space
        self.observation_space = gymnasium.vector.utils.batch_space(family.observation_space, num_envs)
        self.action_space = gymnasium.vector.utils.batch_space(family.action_space, num_envs)
        make_env, keys = family.env_factory(), family.info_keys
        self.workers = AsyncVectorEnv(
            [lambda n=n, s=s: _EnvSlice(make_env, n, s, keys) for n, s in zip(self.sizes, self.starts)],
            shared_memory=False, autoreset_mode=AutoresetMode.DISABLED, observation_mode="different")
        atexit.register(self.close)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options and "tasks" in options:
            options = {"tasks": [self.family.task(code) for code in torch.as_tensor(options["tasks"])]}
        seeds = None if seed is None else [seed * 1000 + start for start in self.starts]
        observations, _ = self.workers.reset(seed=seeds, options=options)
        return self._join(observations), {}

    def step(self, actions):
        space = self.single_action_space
        actions = np.clip(np.asarray(torch.as_tensor(actions), dtype=np.float32), space.low, space.high)
        parts = np.split(actions, np.cumsum(self.sizes)[:-1])
        observations, _, _, _, info = self.workers.step(tuple(parts))
        never = np.zeros(self.num_envs, dtype=bool)
        extra = {key: np.concatenate(list(info[key])) for key in self.family.info_keys}
        return self._join(observations), np.concatenate(list(info["rewards"])), never, never, extra

    def _join(self, observations) -> np.ndarray:
        return np.concatenate(list(observations)).astype(np.float32)

    def close(self, **kwargs) -> None:
        if not self.closed:
            self.workers.close()
            self.closed = True
