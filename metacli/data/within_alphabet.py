"""Lake et al.'s one-shot classification protocol (Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning
through probabilistic program induction", Science 2015): each episode takes ``n_way`` characters of one alphabet,
one drawing of each as the support set (all by one drawer) and one drawing of each as the queries (all by another
drawer), so that telling the characters apart cannot lean on the alphabet or on a drawer's hand.

Omniglot keeps a character's 20 drawings in drawer order (files ``<id>_01.png`` to ``<id>_20.png``), so a drawer is
an image index. Rotated copies (class names ending in ``/rotNNN``) are not characters of the alphabet and are left
out.
"""
from __future__ import annotations

from typing import Callable

import torch

from metacli.data.base import ClassImages
from metacli.data.episodes import EpisodeSampler
from metacli.errors import DataError


def alphabets(class_names: list[str]) -> dict[str, list[int]]:
    """The drawn (unrotated) characters of each alphabet, as class indices: ``<alphabet>/<character>`` names."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(class_names):
        parts = name.split("/")
        if len(parts) == 2:
            groups.setdefault(parts[0], []).append(index)
    return groups


class WithinAlphabetSampler(EpisodeSampler):
    """``n_way``-way one-shot episodes within one alphabet, support and query drawn by two different drawers.

    An episode's alphabet is drawn uniformly from those with at least ``n_way`` characters, then ``n_way`` of its
    characters and an ordered pair of distinct drawers. Episodes depend on the CPU generator only, as
    :class:`EpisodeSampler`'s do.
    """

    def __init__(self, data: ClassImages, n_way: int, normalize: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str = "cpu", where: str = "episodes") -> None:
        super().__init__(data, n_way, 1, 1, normalize, device, where)
        self.alphabets = [torch.tensor(members) for members in alphabets(data.class_names).values()
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
        drawers = torch.rand(batch_size, per_class, generator=generator).argsort(dim=1)[:, :2]  # support, query
        return classes, drawers.unsqueeze(1).expand(-1, self.n_way, -1)
