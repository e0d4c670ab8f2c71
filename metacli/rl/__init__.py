"""Meta-reinforcement learning: task families of environments (``env=``), batched rollouts, returns and advantages,
and the policies and outer-step solvers the meta-RL algorithms share."""
