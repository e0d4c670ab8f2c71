"""torchmeta's data API on metacli's datasets: a torchmeta script runs on modern torch by changing ``torchmeta`` to
``metacli.torchmeta`` in its imports (``datasets``, ``datasets.helpers``, ``transforms``, ``utils.data``).

torchmeta's ``modules`` (``MetaModule`` and friends) are not provided: metacli's learners use ``torch.func``.
"""
from metacli.torchmeta import datasets, transforms, utils

__all__ = ["datasets", "transforms", "utils"]
