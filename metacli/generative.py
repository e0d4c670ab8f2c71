"""Generative evaluation (``eval.protocol=generative``): a generator adapted to a few images of each unseen character
draws new ones, and three measures say whether they are new drawings of that character.

An episode takes ``way`` characters of the split; each character's images are shuffled (fixed by the seed) and, as
every Omniglot image of a character is by another drawer, split by drawer: ``shots`` images condition the
generator, ``judge_shots`` other drawers' images are the judge's support set, and ``samples`` further drawers' images
are the real held-out samples. For each character the learner adapts and draws ``samples`` images.

- **Recognisability** (the score, ``accuracy``): a few-shot classifier trained separately by metacli (the judge, a
  run dir: ``eval.generative.judge``; a ProtoNet) is given the other drawers' images of the episode's characters as
  support and classifies the generated samples. The same judge on the real held-out samples is the ceiling, and on
  samples of the unadapted generator (the meta-learned initialisation, same noise) the floor. The judge classifies
  each image on its own (BatchNorm's running statistics), so generated images never shape its normalisation.
- **Not copies**: each sample's distance (root mean square over pixels) to its nearest conditioning image, against
  the same distance for the real held-out samples; a generator that returns its inputs scores 0 here.
- **Fréchet distance** in the judge's feature space between the generated and the real held-out samples (and the
  unadapted generator's, for scale), over all episodes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from metacli.algorithms.base import FewShotLearner
from metacli.build import build_dataset, build_learner, load_trained
from metacli.data.base import FewShotDataset, unit_range
from metacli.data.episodes import Episode, channels_last_images
from metacli.errors import ConfigError, DataError
from metacli.evaluation import summarize  # evaluation.py imports this module only where it is used
from metacli.logging.progress import Progress
from metacli.saved_config import load_run_config


def load_judge(run_dir: str, device: torch.device) -> tuple[FewShotLearner, FewShotDataset]:
    """The judge: a finished classification run's best learner, with its dataset's input normalisation."""
    if not run_dir:
        raise ConfigError("eval.protocol=generative needs a judge: train a ProtoNet on the same dataset (metacli train "
                          "algo=protonet dataset=omniglot) and set eval.generative.judge=ITS_RUN_DIR")
    cfg = load_run_config(Path(run_dir))
    dataset = build_dataset(cfg)  # its preprocessing only: no images are loaded
    judge = build_learner(cfg, dataset).to(device)
    load_trained(judge, cfg, dataset, Path(run_dir), "best", device)
    judge.bn_mode = "running"
    return judge, dataset


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b`` (FID's formula)."""
    from scipy import linalg  # only generative runs need it

    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    # Features a ReLU never turns on make a covariance singular: a small ridge keeps its square root defined.
    ridge = 1e-6 * torch.eye(a.shape[1], dtype=torch.float64)
    cov_a, cov_b = torch.cov(a.T) + ridge, torch.cov(b.T) + ridge
    root = linalg.sqrtm((cov_a @ cov_b).numpy())
    trace = float(torch.trace(cov_a + cov_b).item() - 2 * root.real.trace())
    return float((mean_a - mean_b).square().sum().item() + trace)


def nearest_distance(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Each sample's root-mean-square pixel distance to its nearest reference image."""
    return (samples.flatten(1)[:, None] - references.flatten(1)[None]).square().mean(-1).min(1).values.sqrt()


class GenerativeEpisodes:
    """The fixed generation episodes of one run: ``trainer.val_seed``'s of the val split select checkpoints,
    ``eval.seed``'s of the test split score. Impossible settings are refused in one line before training."""

    def __init__(self, cfg: DictConfig, dataset: FewShotDataset, device: torch.device) -> None:
        self.settings, self.dataset, self.device = cfg.eval.generative, dataset, device
        self.val = (cfg.trainer.val_episodes, cfg.trainer.val_seed)
        self.test_episodes = (cfg.eval.episodes, cfg.eval.seed)
        self.judge, self.judge_data = load_judge(self.settings.judge, device)
        shots = cfg.algo.get("shots", 4)
        self.split_sizes = (shots, self.settings.judge_shots, self.settings.samples)
        for split in ("val", "test"):
            data = dataset.split(split)
            if sum(self.split_sizes) > data.per_class:
                raise DataError(f"{shots} conditioning + {self.settings.judge_shots} judge + {self.settings.samples} "
                                f"held-out images a character, but {dataset.name} has {data.per_class}: lower "
                                "eval.generative.judge_shots or eval.generative.samples")
            if self.settings.way > data.n_classes:
                raise DataError(f"eval.generative.way={self.settings.way}, but the {split} split has "
                                f"{data.n_classes} characters: lower it")
        self.first_episode: dict[str, torch.Tensor] | None = None

    def _draw(self, split: str, episodes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.dataset.split(split)
        generator = torch.Generator().manual_seed(seed)
        classes = torch.rand(episodes, data.n_classes, generator=generator).argsort(1)[:, :self.settings.way]
        return classes, torch.rand(episodes, self.settings.way, data.per_class, generator=generator).argsort(2)

    def _judge(self, support: torch.Tensor, queries: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The judge's accuracy on ``queries [way, n, C, H, W]`` (uint8-valued floats in [0, 1]) with ``support``
        of the same shape, and the queries' features."""
        way, n_support, n_query = len(support), support.shape[1], queries.shape[1]
        normalize = self.judge_data.normalize

        def inputs(images: torch.Tensor) -> torch.Tensor:
            return channels_last_images(normalize((images.flatten(0, 1) * 255).round()))

        labels = torch.arange(way, device=self.device)
        episode = Episode(inputs(support), labels.repeat_interleave(n_support), inputs(queries),
                          labels.repeat_interleave(n_query), way)
        with torch.no_grad(), self.judge.evaluation_mode():
            accuracy = (self.judge.predict(episode, training=False).argmax(1) == episode.query_y).float().mean()
            features = self.judge.representation()(episode.query_x)
        return accuracy.item(), features

    def _episodes(self, learner: FewShotLearner, split: str, episodes: int, seed: int, progress: Progress | None = None,
                  between=None) -> dict[str, list]:
        data, (shots, judge_shots, samples) = self.dataset.split(split), self.split_sizes
        classes, order = self._draw(split, episodes, seed)
        scored: dict[str, list] = {name: [] for name in ("accuracy", "ceiling", "floor", "copy", "real_copy")}
        # The judge's accuracy on each kind of sample is scored under the name the results give it.
        judged = {"generated": "accuracy", "real": "ceiling", "unadapted": "floor"}
        features: dict[str, list] = {kind: [] for kind in judged}
        for index in range(episodes):
            if between is not None:
                between()
            images = unit_range(data.images[classes[index, :, None], order[index]].to(self.device))
            conditioning, support = images[:, :shots], images[:, shots:shots + judge_shots]
            real = images[:, shots + judge_shots:shots + judge_shots + samples]
            generated, unadapted = zip(*(learner.draw(character, samples, learner.seed + index * 1000 + c)
                                         for c, character in enumerate(conditioning)))
            generated, unadapted = torch.stack(generated), torch.stack(unadapted)
            for kind, queries in (("generated", generated), ("real", real), ("unadapted", unadapted)):
                accuracy, judge_features = self._judge(support, queries)
                scored[judged[kind]].append(accuracy)
                features[kind].append(judge_features)
            for name, samples_of in (("copy", generated), ("real_copy", real)):
                distances = [nearest_distance(drawn, given) for drawn, given in zip(samples_of, conditioning)]
                scored[name].append(torch.cat(distances).mean().item())
            if index == 0:
                self.first_episode = {"conditioning": conditioning.cpu(), "generated": generated.cpu(),
                                      "real": real.cpu(), "unadapted": unadapted.cpu()}
            if progress is not None:
                progress.advance(status=f"recognisability {sum(scored['accuracy']) / len(scored['accuracy']):.3f}")
        real = torch.cat(features["real"])
        return {**scored, "fid": frechet_distance(torch.cat(features["generated"]), real),
                "fid_unadapted": frechet_distance(torch.cat(features["unadapted"]), real)}

    def validate(self, learner: FewShotLearner) -> dict:
        """Recognisability on the validation episodes: what selects the checkpoint (``val/accuracy``)."""
        return summarize(self._episodes(learner, "val", *self.val)["accuracy"], "accuracy")

    def test(self, learner: FewShotLearner, between=None) -> tuple[dict, dict]:
        episodes, seed = self.test_episodes
        with Progress("test", total=episodes, unit="episodes") as progress:
            scored = self._episodes(learner, "test", episodes, seed, progress, between)
        extra = {"task": {"protocol": "generative", "n_way": self.settings.way, "shots": self.split_sizes[0],
                          "judge_shots": self.split_sizes[1], "samples": self.split_sizes[2]},
                 "bn_mode": "running",
                 "generative": {"judge": str(self.settings.judge),
                                "ceiling": summarize(scored["ceiling"], "accuracy"),
                                "floor": summarize(scored["floor"], "accuracy"),
                                "copy_distance": {"generated": summarize(scored["copy"], "distance"),
                                                  "real": summarize(scored["real_copy"], "distance")},
                                "frechet": {"generated": scored["fid"], "unadapted": scored["fid_unadapted"]}}}
        return {**summarize(scored["accuracy"], "accuracy"), "episodes": episodes,
                "per_episode": scored["accuracy"]}, extra


#: The protocol's scorer, as :mod:`metacli.evaluation` builds it.
Protocol = GenerativeEpisodes


def fingerprint(cfg: DictConfig, dataset: FewShotDataset) -> dict:
    """What fixes the test episodes (characters, conditioning images, judge support, held-out samples)."""
    settings = cfg.eval.generative
    return {"dataset": dataset.describe(), "split": "test", "content_sha256": dataset.content_sha256("test"),
            "protocol": "generative", "way": settings.way, "shots": cfg.algo.get("shots", 4),
            "judge_shots": settings.judge_shots, "samples": settings.samples, "eval_seed": cfg.eval.seed,
            "episodes": cfg.eval.episodes}
