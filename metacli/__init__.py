"""metacli: a config-driven command line for meta-learning research."""
from metacli.api import load_learner

__all__ = ["load_learner"]
__version__ = "0.1.0"
