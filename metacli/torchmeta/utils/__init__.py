"""torchmeta's ``utils``: the data loaders (``utils.data``)."""
from metacli.torchmeta.utils import data

__all__ = ["data"]
