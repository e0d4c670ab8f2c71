"""How a meta-batch runs, apart from what the algorithms compute: task by task, over worker threads, with a
shared first inner step or vectorised, with checkpointed inner loops (``execution.*``), under a training precision
(``trainer.precision``), optionally timed by phase (``scripts/bench.py``). Learners are driven through the
interface of :mod:`metacli.algorithms.base` only."""
