"""Lake et al.'s one-shot classification protocol (Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning
through probabilistic program induction", Science 2015): each episode takes ``n_way`` characters of one alphabet,
one drawing of each as the support set (all by one drawer) and one drawing of each as the queries (all by another
drawer), so that telling the characters apart cannot lean on the alphabet or on a drawer's hand.

Omniglot keeps a character's 20 drawings in drawer order (files ``<id>_01.png`` to ``<id>_20.png``), so a drawer is
an image index. Rotated copies (class names ending in ``/rotNNN``) are not characters of the alphabet: the protocol
leaves them out; training episodes may use each rotation of an alphabet as an alphabet of its own.
"""
from __future__ import annotations

from typing import Callable

import torch

from metacli.data.base import ClassImages
from metacli.data.episodes import EpisodeSampler
from metacli.errors import ConfigError, DataError


def alphabets(class_names: list[str], rotated: bool = False) -> dict[str, list[int]]:
    """The characters of each alphabet, as class indices: ``<alphabet>/<character>`` names. With ``rotated``, each
    rotation of an alphabet (``<alphabet>/<character>/rotNNN``) is one more alphabet, ``<alphabet>/rotNNN``."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(class_names):
        parts = name.split("/")
        if len(parts) == 2 or (rotated and len(parts) == 3):
            groups.setdefault("/".join(parts[:1] + parts[2:]), []).append(index)
    return groups


def require_alphabets(dataset, option: str) -> None:
    """Refuse, in one line, episodes within one alphabet (asked for by ``option``) of a dataset without alphabets."""
    if not dataset.has_alphabets:
        raise ConfigError(f"{option}=within_alphabet draws each episode from one alphabet, and {type(dataset).__name__}"
                          f" has no alphabets: use dataset=omniglot, or {option}=episodes")


class WithinAlphabetSampler(EpisodeSampler):
    """``n_way``-way episodes within one alphabet, support and queries by different drawers.

    An episode's alphabet is drawn uniformly from those with at least ``n_way`` characters, then ``n_way`` of its
    characters and ``k_shot + n_query`` distinct drawers: the first ``k_shot`` drew every support image, the others
    the queries, one each. One shot and one query is Lake et al.'s protocol; more, with ``rotated``, are training
    episodes of the same kind. Episodes depend on the CPU generator only, as :class:`EpisodeSampler`'s do.
    """

    def __init__(self, data: ClassImages, n_way: int, normalize: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str = "cpu", where: str = "episodes", k_shot: int = 1, n_query: int = 1,
                 rotated: bool = False) -> None:
        super().__init__(data, n_way, k_shot, n_query, normalize, device, where)
        self.alphabets = [torch.tensor(members) for members in alphabets(data.class_names, rotated).values()
                          if len(members) >= n_way]
        if not self.alphabets:
            raise DataError(f"{where}: no alphabet has {n_way} characters for within-alphabet episodes; lower the "
                            "way or use a split that keeps whole alphabets")

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        per_class = self.images.shape[1]
        chosen = torch.randint(len(self.alphabets), (batch_size,), generator=generator)
        classes = torch.stack([
            self.alphabets[a][torch.randperm(len(self.alphabets[a]), generator=generator)[: self.n_way]]
            for a in chosen.tolist()])
        drawers = torch.rand(batch_size, per_class, generator=generator).argsort(dim=1)[:, : self.k_shot + self.n_query]
        return classes, drawers.unsqueeze(1).expand(-1, self.n_way, -1)
