"""Python API: load a finished run and classify new images with the same preprocessing as training.

    >>> from metacli import load_learner
    >>> learner = load_learner("outputs/train/2026-01-01/12-00-00-protonet-omniglot")
    >>> labels = learner.predict(support_images, support_labels, query_images)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from metacli.errors import DataError


class FewShotPredictor:
    """A trained learner bound to its dataset's preprocessing."""

    def __init__(self, learner, dataset, device: torch.device) -> None:
        self.learner, self.dataset, self.device = learner, dataset, device

    def _encode(self, images: Sequence) -> torch.Tensor:
        size, channels = self.dataset.image_size, self.dataset.channels
        encoded = []
        for image in images:
            if isinstance(image, torch.Tensor):
                if image.dtype != torch.uint8:
                    raise DataError(f"image tensors must be uint8 (0..255), got {image.dtype}: convert with "
                                    "(x * 255).round().to(torch.uint8)")
                if tuple(image.shape) != (channels, size, size):
                    mode = "L" if image.dim() == 2 or image.shape[0] == 1 else "RGB"
                    array = image.squeeze(0) if image.dim() == 3 and image.shape[0] == 1 else image
                    array = array.permute(1, 2, 0) if array.dim() == 3 else array
                    image = Image.fromarray(array.contiguous().numpy(), mode=mode)
            if isinstance(image, Image.Image):
                image = self.dataset.encode_image(image)
            encoded.append(image)
        return self.dataset.normalize(torch.stack(encoded).to(self.device))

    @torch.no_grad()
    def predict(self, support_images: Sequence, support_labels: Sequence, query_images: Sequence):
        """Labels (from ``support_labels``' own label set) predicted for ``query_images``.

        Images are PIL images or uint8 tensors (``C x H x W`` or ``H x W``, any size: resized like training data).
        """
        from metacli.data.episodes import Episode

        labels = [int(label) for label in support_labels]
        classes = sorted(set(labels))
        if self.learner.fixed_way and len(classes) != self.learner.n_way:
            raise DataError(f"this {type(self.learner).__name__} was trained {self.learner.n_way}-way, "
                            f"so the support set needs exactly {self.learner.n_way} classes, not {len(classes)}")
        index = {c: i for i, c in enumerate(classes)}
        support_y = torch.tensor([index[label] for label in labels], device=self.device)
        episode = Episode(self._encode(support_images), support_y, self._encode(query_images),
                          torch.zeros(len(query_images), dtype=torch.long, device=self.device), len(classes))
        with self.learner.evaluation_mode():
            predicted = self.learner.predict(episode, training=False).argmax(dim=1)
        lookup = torch.tensor(classes)
        return lookup[predicted.cpu()]


def load_learner(run_dir: str | Path, which: str = "best", device: str = "cpu") -> FewShotPredictor:
    """Rebuild the learner of ``run_dir`` from its saved config and load its ``best`` (or ``last``) checkpoint."""
    from metacli.build import build_dataset, build_learner, load_trained
    from metacli.saved_config import load_run_config

    run_dir, device = Path(run_dir), torch.device(device)
    cfg = load_run_config(run_dir)
    dataset = build_dataset(cfg)  # builds the preprocessing only: no images are loaded
    learner = build_learner(cfg, dataset).to(device)
    load_trained(learner, cfg, dataset, run_dir, which, device)
    learner.eval()
    return FewShotPredictor(learner, dataset, device)
