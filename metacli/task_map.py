"""``metacli embed-tasks RUN_DIR``: a map of tasks, and whether it knows the alphabets.

A fixed set of within-alphabet test episodes (each episode's characters from one alphabet of the test split, as in
Lake et al.'s protocol) is embedded by the run's task encoder: :meth:`FewShotLearner.task_embedding`, the mean of
the support set's class prototypes, which is what TADAM conditions its backbone on (any learner with a
representation has one, so a ProtoNet run gives the map to compare with). It writes:

- ``task_map.png``: the embeddings projected on their first two principal components, coloured by alphabet;
- ``task_map.json``: the number, **nearest-neighbour alphabet purity**: the share of episodes whose nearest other
  episode (Euclidean) comes from the same alphabet, ± its 95 % CI over episodes, against the same purity with the
  alphabet labels shuffled (the mean and the 2.5-97.5 % range over ``--shuffles`` permutations, and the share of
  permutations that reach the observed purity, a permutation test's p-value).

The episodes depend on the test split's content and ``--seed`` alone, so two runs on the same dataset are mapped
on the same tasks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from metacli.arguments import ArgumentParser
from metacli.errors import ConfigError
from metacli.logging.console import print_table
from metacli.reliability.atomic import replace_file

MAP_IMAGE, MAP_FILE = "task_map.png", "task_map.json"


def arguments() -> ArgumentParser:
    parser = ArgumentParser("metacli embed-tasks", __doc__)
    parser.add_argument("run_dir", help="a finished run dir (metacli train) on Omniglot")
    parser.add_argument("--episodes", type=int, default=600, help="within-alphabet test episodes to embed")
    parser.add_argument("--seed", type=int, default=0, help="fixes the episodes")
    parser.add_argument("--shuffles", type=int, default=1000, help="permutations of the alphabet labels")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="the checkpoint")
    parser.add_argument("--out", help="where task_map.png and task_map.json go (default: the run dir)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    return parser


def nearest_others(embeddings: torch.Tensor) -> torch.Tensor:
    """For each row, the index of its nearest other row (Euclidean)."""
    return torch.cdist(embeddings, embeddings).fill_diagonal_(math.inf).argmin(dim=1)


def purity(embeddings: torch.Tensor, labels: torch.Tensor, shuffles: int, seed: int) -> dict:
    """Nearest-neighbour purity ± its 95 % CI over episodes, and the same with the labels permuted ``shuffles``
    times (mean, 2.5-97.5 % range, and the permutation test's p-value). The neighbours are found once: a permutation
    changes the labels, not who is nearest."""
    neighbours = nearest_others(embeddings)
    hits = (labels[neighbours] == labels).double()
    observed = hits.mean().item()
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([(permuted[neighbours] == permuted).double().mean()
                            for permuted in (labels[torch.randperm(len(labels), generator=generator)]
                                             for _ in range(shuffles))])
    low, high = torch.quantile(shuffled, torch.tensor([0.025, 0.975], dtype=shuffled.dtype)).tolist()
    return {"purity": observed, "ci95": 1.96 * hits.std().item() / math.sqrt(len(hits)),
            "shuffled": {"purity": shuffled.mean().item(), "range95": [low, high], "shuffles": shuffles,
                         "p_value": (1 + int((shuffled >= observed).sum())) / (1 + shuffles)}}


def projection(embeddings: torch.Tensor) -> torch.Tensor:
    """The rows on their first two principal components."""
    centred = embeddings - embeddings.mean(dim=0)
    return centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T


@torch.no_grad()
def embed_episodes(run_dir: Path, episodes: int, seed: int, which: str) -> tuple[dict, torch.Tensor, list[str]]:
    """The run's summary, its task embeddings of ``episodes`` within-alphabet test episodes, and each one's
    alphabet."""
    from metacli.build import build_dataset, build_learner, load_trained
    from metacli.data.within_alphabet import WithinAlphabetSampler, alphabets
    from metacli.saved_config import load_run_config

    cfg = load_run_config(run_dir)
    dataset = build_dataset(cfg)
    learner = build_learner(cfg, dataset)
    name = type(learner).__name__
    if learner.representation() is None:
        raise ConfigError(f"{name} has no representation to embed tasks with: map a run of algo=tadam, "
                          "algo=protonet, algo=baseline, algo=oml or algo=anml")
    n_way, k_shot = cfg.task.n_way, cfg.task.k_shot
    test = dataset.split("test")
    groups = {alphabet: members for alphabet, members in alphabets(test.class_names).items() if len(members) >= n_way}
    if len(groups) < 2:
        raise ConfigError(f"embed-tasks colours tasks by alphabet, and {dataset.name}'s test split has "
                          f"{len(groups)} alphabet(s) of {n_way} or more characters: map an Omniglot run")
    load_trained(learner, cfg, dataset, run_dir, which, torch.device("cpu"))
    sampler = WithinAlphabetSampler(test, n_way, dataset.normalize, where="test split", k_shot=k_shot)
    alphabet_of = {index: alphabet for alphabet, members in groups.items() for index in members}
    classes, picks = sampler.draw(episodes, torch.Generator().manual_seed(seed))
    embeddings = []
    with learner.evaluation_mode():
        for start in range(0, episodes, 50):
            for episode in sampler.gather(classes[start:start + 50], picks[start:start + 50]):
                embeddings.append(learner.task_embedding(episode))
    summary = {"run": str(run_dir), "algorithm": name, "dataset": dataset.name, "split": "test",
               "task": {"n_way": n_way, "k_shot": k_shot}, "episodes": episodes, "seed": seed, "checkpoint": which}
    return summary, torch.stack(embeddings).double(), [alphabet_of[int(c)] for c in classes[:, 0]]


def main(argv: list[str]) -> None:
    args = arguments().parse_args(argv)
    if args.episodes < 3 or args.shuffles < 1:
        raise ConfigError(f"--episodes {args.episodes} --shuffles {args.shuffles}: use at least 3 episodes (each "
                          "needs a neighbour besides itself) and 1 shuffle")
    run_dir = Path(args.run_dir)
    summary, embeddings, names = embed_episodes(run_dir, args.episodes, args.seed, args.which)
    alphabet_names = sorted(set(names))
    labels = torch.tensor([alphabet_names.index(n) for n in names])
    scored = {**summary, "alphabets": len(alphabet_names), **purity(embeddings, labels, args.shuffles, args.seed)}
    out = Path(args.out) if args.out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    from metacli.plots import save, task_map_figure

    points = projection(embeddings)
    title = (f"{summary['algorithm']} task embeddings: {args.episodes} within-alphabet {summary['task']['n_way']}-way "
             f"{summary['task']['k_shot']}-shot test episodes")
    save(task_map_figure(points, labels, alphabet_names, title, scored), out / MAP_IMAGE)
    replace_file(out / MAP_FILE, (json.dumps(scored, indent=2) + "\n").encode())
    if args.format == "json":
        print(json.dumps(scored, indent=2))
        return
    shuffled = scored["shuffled"]
    print_table(f"nearest-neighbour alphabet purity of {args.episodes} test episodes over {len(alphabet_names)} "
                f"alphabets", ["", "purity"],
                [[f"{summary['algorithm']} task embeddings", f"{100 * scored['purity']:.2f} ± {100 * scored['ci95']:.2f} %"],
                 [f"alphabet labels shuffled ({shuffled['shuffles']} times)",
                  f"{100 * shuffled['purity']:.2f} % (95 % of shuffles in {100 * shuffled['range95'][0]:.2f}-"
                  f"{100 * shuffled['range95'][1]:.2f} %)"],
                 ["permutation test", f"p = {shuffled['p_value']:.3g}"]])
    print(f"outputs in {out}: {MAP_IMAGE}, {MAP_FILE}")
