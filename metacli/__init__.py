"""metacli: a config-driven command line for meta-learning research."""

__all__ = ["load_learner"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: the commands that only read results (report, compare, list, completion) start
    # without loading torch.
    if name == "load_learner":
        from metacli.api import load_learner

        return load_learner
    raise AttributeError(f"module 'metacli' has no attribute {name!r}")
