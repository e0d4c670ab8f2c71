"""Continual evaluation (``eval.protocol=continual``): class-incremental streams of unseen classes learned online,
in one pass, on a frozen representation, the protocol of OML (Javed & White 2019) and ANML (Beaulieu et al. 2020).

A stream of L classes shows ``train_shots`` images of its first class one at a time, then those of its second, and
so on; a zero-initialised linear head over the L classes takes one SGD step on each image
(:mod:`metacli.algorithms.online`). At the end of the stream the head classifies the other images of every class:
that accuracy is the retention. A class's accuracy right after it was learned, less that at the end, is its
forgetting. The accuracy on the learned images themselves is reported too (what the head still remembers of them).

Streams are fixed by a seed (their classes, the order, which images are learned and which test), so every learner
is scored on the same ones. The online rate is chosen for each length on validation streams, of as many classes as
the validation split has when it has fewer, never on the test streams. Features come from the learner's
representation in evaluation mode (BatchNorm's running statistics), so that each image is represented on its own
as online learning sees it; they are computed once per image of the split and gathered into streams.
"""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.online import OnlineHeads
from metacli.data.base import ClassImages, FewShotDataset
from metacli.data.episodes import channels_last_images
from metacli.errors import ConfigError, DataError
from metacli.evaluation import summarize  # evaluation.py imports this module only where it is used
from metacli.logging.progress import Progress

#: Images a forward of the representation takes at once.
CHUNK = 512


@torch.no_grad()
def split_features(learner: FewShotLearner, data: ClassImages, normalize: Callable[[torch.Tensor], torch.Tensor],
                   device: torch.device) -> torch.Tensor:
    """The representation of every image of a split, ``[classes, per_class, D]``, each image on its own (evaluation
    mode); the learner's mode is restored after."""
    network, was_training = learner.representation(), learner.training
    learner.eval()
    try:
        flat = data.images.flatten(0, 1)
        features = torch.cat([network(channels_last_images(normalize(flat[start:start + CHUNK].to(device))))
                              for start in range(0, len(flat), CHUNK)])
    finally:
        learner.train(was_training)
    return features.reshape(data.n_classes, data.per_class, -1).float()


def draw_streams(n_classes: int, per_class: int, length: int, streams: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``streams`` streams of ``length`` classes fixed by ``seed``: the classes in stream order ``[S, L]`` and each
    class's images in a random order ``[S, L, per_class]`` (the first are learned, the rest test)."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.rand(streams, n_classes, generator=generator).argsort(dim=1)[:, :length]
    return classes, torch.rand(streams, length, per_class, generator=generator).argsort(dim=2)


@torch.no_grad()
def learn_streams(features: torch.Tensor, classes: torch.Tensor, order: torch.Tensor, train_shots: int,
                  lrs: list[float], between_classes: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """Learn every stream online with every rate at once; per rate and stream (``[R, S]``): ``accuracy`` (the
    retention: the test images of all classes at the end), ``train_accuracy`` (the learned images at the end) and
    ``forgetting`` (the mean over classes of the test accuracy just after the class, less that at the end)."""
    streams, length = classes.shape
    lr = torch.tensor(lrs, device=features.device)[:, None]  # [R, 1]: one rate per row of heads
    heads = OnlineHeads((len(lrs), streams), length, features.shape[-1], features.device)

    def images(position: int, learned: bool) -> torch.Tensor:  # [S, n, D] of the class at ``position``
        picks = order[:, position, :train_shots] if learned else order[:, position, train_shots:]
        return features[classes[:, position, None], picks]

    def accuracy(position: int, learned: bool) -> torch.Tensor:  # [R, S]
        return (heads.predict(images(position, learned)) == position).float().mean(-1)

    just_learned = []
    for position in range(length):
        if between_classes is not None:
            between_classes()
        for sample in images(position, learned=True).unbind(1):
            heads.learn(sample, position, lr)
        just_learned.append(accuracy(position, learned=False))
    at_end = torch.stack([accuracy(position, learned=False) for position in range(length)], -1)  # [R, S, L]
    return {"accuracy": at_end.mean(-1),
            "train_accuracy": torch.stack([accuracy(p, learned=True) for p in range(length)], -1).mean(-1),
            "forgetting": (torch.stack(just_learned, -1) - at_end).mean(-1)}


class ContinualStreams:
    """The fixed streams of one run (``eval.continual``): validation streams of ``trainer.val_seed`` choose the
    online rate and select checkpoints, test streams of ``eval.seed`` score. Impossible settings are refused here,
    before any training, in one line."""

    def __init__(self, cfg: DictConfig, dataset: FewShotDataset, device: torch.device) -> None:
        self.settings = settings = cfg.eval.continual
        self.dataset, self.device = dataset, device
        self.val_seed, self.test_seed = cfg.trainer.val_seed, cfg.eval.seed
        self.lengths = [int(length) for length in settings.lengths]
        test, val = dataset.split("test"), dataset.split("val")
        if not self.lengths or min(self.lengths) < 2:
            raise ConfigError(f"eval.continual.lengths={OmegaConf.to_container(settings.lengths)}: a stream needs at "
                              "least 2 classes; give lengths of 2 or more, e.g. eval.continual.lengths=[10,50]")
        if max(self.lengths) > test.n_classes:
            raise DataError(f"eval.continual.lengths asks for a stream of {max(self.lengths)} classes, but "
                            f"{dataset.name}'s test split has only {test.n_classes}: lower the longest length to at "
                            f"most {test.n_classes}")
        if settings.val_length > val.n_classes:
            raise DataError(f"eval.continual.val_length={settings.val_length}, but {dataset.name}'s val split has "
                            f"only {val.n_classes} classes: lower it to at most {val.n_classes}")
        if settings.train_shots >= min(test.per_class, val.per_class):
            raise DataError(f"eval.continual.train_shots={settings.train_shots} leaves no image of a class to test it "
                            f"on ({dataset.name} has {test.per_class} a class): lower it to at most "
                            f"{test.per_class - 1}")
        if not settings.lrs or min(settings.lrs) <= 0:
            raise ConfigError(f"eval.continual.lrs={OmegaConf.to_container(settings.lrs)}: give one or more positive "
                              "online learning rates, e.g. eval.continual.lrs=[0.1,0.03,0.01]")
        self.val_classes = val.n_classes

    def _run(self, learner: FewShotLearner, split: str, length: int, streams: int, seed: int, lrs: list[float],
             between: Callable[[], None] | None = None, features: torch.Tensor | None = None) -> dict:
        data = self.dataset.split(split)
        if features is None:
            features = split_features(learner, data, self.dataset.normalize, self.device)
        classes, order = draw_streams(data.n_classes, data.per_class, length, streams, seed)
        return learn_streams(features, classes.to(self.device), order.to(self.device), self.settings.train_shots,
                             lrs, between)

    def choose_rate(self, learner: FewShotLearner, length: int, features: torch.Tensor | None = None
                    ) -> tuple[float, dict]:
        """The rate of ``lrs`` with the best retention on validation streams of ``length`` classes (of the val
        split's count if it has fewer), and that rate's validation scores."""
        lrs = [float(lr) for lr in self.settings.lrs]
        scored = self._run(learner, "val", min(length, self.val_classes), self.settings.val_streams, self.val_seed,
                           lrs, features=features)
        best = int(scored["accuracy"].mean(-1).argmax())
        return lrs[best], {name: values[best].tolist() for name, values in scored.items()}

    def validate(self, learner: FewShotLearner) -> dict:
        """Retention on the validation streams of ``val_length`` classes at the best rate: what selects the
        checkpoint (``val/accuracy``)."""
        lr, scored = self.choose_rate(learner, self.settings.val_length)
        return {**summarize(scored["accuracy"], "accuracy"), "lr": lr}

    def test(self, learner: FewShotLearner, between: Callable[[], None] | None = None) -> tuple[dict, dict]:
        """Every length's test streams at its validation-chosen rate: the score (retention at the longest length,
        ± 95 % CI over streams) and the record's continual part."""
        settings = self.settings
        val_features = split_features(learner, self.dataset.split("val"), self.dataset.normalize, self.device)
        test_features = split_features(learner, self.dataset.split("test"), self.dataset.normalize, self.device)
        by_length = []
        with Progress("test streams", total=sum(self.lengths), unit="classes") as progress:
            for length in self.lengths:
                lr, val_scored = self.choose_rate(learner, length, val_features)
                scored = {name: values[0].tolist() for name, values in self._run(
                    learner, "test", length, settings.streams, self.test_seed, [lr], between, test_features).items()}
                by_length.append({"classes": length, "lr": lr, "val_classes": min(length, self.val_classes),
                                  "val_accuracy": summarize(val_scored["accuracy"], "accuracy")["accuracy"],
                                  **{name: summarize(values, name) for name, values in scored.items()},
                                  "per_stream": scored["accuracy"]})
                retention = by_length[-1]["accuracy"]["accuracy"]
                progress.advance(length, status=f"{length} classes: retention {retention:.3f}")
        longest = by_length[-1]
        extra = {"task": {"protocol": "continual", "lengths": self.lengths, "streams": settings.streams,
                          "train_shots": settings.train_shots},
                 "bn_mode": "running", "continual": by_length}
        return {**summarize(longest["per_stream"], "accuracy"), "episodes": settings.streams,
                "per_episode": longest["per_stream"]}, extra


#: The protocol's scorer, as :mod:`metacli.evaluation` builds it.
Protocol = ContinualStreams


def fingerprint(cfg: DictConfig, dataset: FewShotDataset) -> dict:
    """What fixes the test streams: ``metacli compare`` pairs two runs stream by stream at the longest length."""
    settings = cfg.eval.continual
    return {"dataset": dataset.describe(), "split": "test", "content_sha256": dataset.content_sha256("test"),
            "protocol": "continual", "lengths": [int(length) for length in settings.lengths],
            "streams": settings.streams, "train_shots": settings.train_shots, "eval_seed": cfg.eval.seed}
