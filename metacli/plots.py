"""Pictures of a run, written next to its results (``trainer.plots``) and logged to W&B as images:

- ``curves.png``: the training loss (a meta-RL run's sampled returns) and the validation metric (accuracy, MSE,
  return; ± its 95 % CI) against the step;
- ``episode.png``: the first test episode, its support images by class, and its queries with the predicted class,
  wrong predictions framed in red;
- ``episode.png`` of a regression run: one test task's support points, the true curve, and the learner's
  prediction after adapting to them;
- ``adaptation.png`` of a meta-RL run: the mean return on the test tasks (± its 95 % CI) at each adaptation stage;
- ``retention.png`` of a continual run (``eval.protocol=continual``), and of all of them in ``metacli report
  --plots DIR``: the accuracy at the end of a stream (± its 95 % CI over streams) and the forgetting per class,
  against the stream's length;
- ``generation.png`` of a generative run (``eval.protocol=generative``): for each character of the first test
  episode, the images the generator adapted to, then its new ones, then real held-out ones and the unadapted
  generator's;
- ``task_map.png`` of ``metacli embed-tasks``: within-alphabet test episodes' task embeddings on their first two
  principal components, coloured by alphabet;
- for a sweep, in its dir: ``sweep_curves.png``, every job's validation metric against the step, and
  ``sweep_scores.png``, the test score (± its CI) and the best validation score against the swept value, when
  the sweep varies one setting besides the seed.

Figures are drawn on matplotlib's Agg canvas directly, so no display and no pyplot state is involved.
"""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metacli.algorithms.base import FewShotLearner
from metacli.data.base import FewShotDataset
from metacli.data.episodes import EpisodeSampler
from metacli.logging.jsonl import read_rows
from metacli.reliability.run_dir import METRICS
from metacli.report import protocol_overrides

CURVES, EPISODE, ADAPTATION, RETENTION, GENERATION = ("curves.png", "episode.png", "adaptation.png", "retention.png",
                                                     "generation.png")
SWEEP_CURVES, SWEEP_SCORES = "sweep_curves.png", "sweep_scores.png"


def save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
    return path


def _scale(metric: str) -> tuple[float, str]:
    """How a metric is drawn: accuracy in percent, anything else as it is."""
    return (100.0, f"{metric} (%)") if metric in ("accuracy", "success") else (1.0, metric)


def curves_figure(rows: list[dict], title: str, metric: str = "accuracy") -> Figure:
    """Two panels: training loss by step, the validation metric by step with its 95 % CI."""
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    loss_axes, val_axes = figure.subplots(1, 2)
    scale, label = _scale(metric)
    val = [(r["step"], scale * r[f"val/{metric}"], scale * r["val/ci95"]) for r in rows if f"val/{metric}" in r]
    # Meta-RL's losses are surrogates (TRPO's is zero where it is taken): its training curve is the sampled return.
    shown = sorted({key for r in rows for key in r if key.startswith("train/return")}) if metric == "return" \
        else ["train/loss"]
    for key in shown:
        train = [(r["step"], r[key]) for r in rows if key in r]
        if train:
            loss_axes.plot(*zip(*train), label=key.removeprefix("train/").replace("_", " "))
    if len(shown) > 1:
        loss_axes.legend(fontsize=8)
    name = "training return" if metric == "return" else "training loss"
    loss_axes.set(xlabel="meta-training step", ylabel=name, title=name)
    if val:
        steps, values, ci = zip(*val)
        val_axes.errorbar(steps, values, yerr=ci, marker="o", capsize=3, color="tab:green")
    val_axes.set(xlabel="meta-training step", ylabel=label, title=f"validation {metric} (95 % CI)")
    figure.suptitle(title)
    return figure


def regression_figure(learner: FewShotLearner, sampler, seed: int) -> Figure:
    """The first test task: its support points, the true curve, and the prediction after adapting to them."""
    episode, grid, truth = sampler.curve(seed)
    with learner.evaluation_mode():
        predicted = learner.predict(episode, training=False).detach().cpu().view(-1)
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    axes.plot(grid, truth, color="black", label="truth")
    axes.plot(grid, predicted, color="tab:red", linestyle="--", label="after adapting")
    axes.scatter(episode.support_x.cpu().view(-1), episode.support_y.cpu().view(-1), color="tab:blue", zorder=3,
                 label=f"support ({len(episode.support_x)} points)")
    mse = float(((predicted - truth) ** 2).mean())
    axes.set(xlabel="x", ylabel="y", title=f"one test task: MSE {mse:.3f} over the input range")
    axes.legend(fontsize=8)
    return figure


def _pixels(images: torch.Tensor, dataset: FewShotDataset) -> torch.Tensor:
    """Normalised ``[N, C, H, W]`` back to ``[N, H, W, C]`` in 0..1 for display."""
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def episode_figure(learner: FewShotLearner, sampler: EpisodeSampler, dataset: FewShotDataset, seed: int,
                   max_queries: int = 10) -> Figure:
    """The first of the test episodes fixed by ``seed``: support images by class (rows), then up to
    ``max_queries`` queries of every class, each with its predicted class; errors framed in red."""
    batch = next(sampler.fixed(1, seed, 1))
    episode = next(iter(batch))
    with learner.evaluation_mode():
        predicted = learner.predict(episode, training=False).detach().argmax(dim=1).cpu()
    shots, per_class = len(episode.support_y) // episode.n_way, len(episode.query_y) // episode.n_way
    # Queries come grouped by class: take them round-robin, so every class is shown.
    shown = [c * per_class + j for j in range(per_class) for c in range(episode.n_way)][:max_queries]
    queries = len(shown)
    columns = max(shots, queries)
    figure = Figure(figsize=(1.2 * columns, 1.3 * (episode.n_way + 1)), layout="constrained")
    grid = figure.subplots(episode.n_way + 1, columns, squeeze=False)
    support, query = _pixels(episode.support_x, dataset), _pixels(episode.query_x, dataset)
    gray = "gray" if dataset.channels == 1 else None
    for axes in grid.flat:
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_frame_on(False)
    for index, label in enumerate(episode.support_y.cpu().tolist()):
        axes = grid[label, index % shots]
        axes.imshow(support[index].squeeze(-1) if gray else support[index], cmap=gray)
        if index % shots == 0:
            axes.set_ylabel(f"class {label}")
    for column, index in enumerate(shown):
        axes, truth, guess = grid[-1, column], int(episode.query_y[index]), int(predicted[index])
        axes.imshow(query[index].squeeze(-1) if gray else query[index], cmap=gray)
        axes.set_title(f"{guess}" if guess == truth else f"{guess} (is {truth})", fontsize=8,
                       color="black" if guess == truth else "red")
        if guess != truth:
            axes.set_frame_on(True)
            for side in axes.spines.values():
                side.set(color="red", linewidth=2.5)
    errors = int((predicted[shown] != episode.query_y.cpu()[shown]).sum())
    figure.suptitle(f"support (rows: classes) and {queries} queries with predictions: {errors} wrong")
    return figure


def _varied(settings: list[list[str]]) -> list[list[str]]:
    """Of each run's ``key=value`` overrides, those whose value is not the same in every run."""
    as_dicts = [dict(o.split("=", 1) for o in given if "=" in o) for given in settings]
    keys = sorted({key for given in as_dicts for key in given})
    varied = [key for key in keys if len({given.get(key) for given in as_dicts}) > 1]
    return [[f"{key}={given.get(key, '-')}" for key in varied] for given in as_dicts]


def sweep_curves_figure(runs: list[tuple[str, list[dict]]], metric: str = "accuracy") -> Figure:
    """The validation metric against the step, one line a job, labelled by what sets the job apart."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    scale, unit = _scale(metric)
    for label, rows in runs:
        val = [(r["step"], scale * r[f"val/{metric}"]) for r in rows if f"val/{metric}" in r]
        if val:
            axes.plot(*zip(*val), marker=".", label=label)
    axes.set(xlabel="meta-training step", ylabel=unit, title=f"validation {metric} of every job")
    if 0 < len(runs) <= 12:  # beyond a dozen a legend hides the curves
        axes.legend(fontsize=7)
    return figure


def sweep_scores_figure(key: str, points: list[tuple[str, float, float, float]], metric: str) -> Figure:
    """Test score ± its CI and best validation score against the swept value: ``(value, test, ci95, best val)``
    per protocol. Numeric values share a numeric axis (logarithmic when they span two decades); others are
    categories."""
    figure = Figure(figsize=(6.5, 4.2), layout="constrained")
    axes = figure.subplots()
    scale, unit = _scale(metric)
    try:
        xs = [float(value) for value, *_ in points]
    except ValueError:
        xs = list(range(len(points)))
        axes.set_xticks(xs, [value for value, *_ in points])
    else:
        if min(xs) > 0 and max(xs) / min(xs) >= 100:
            axes.set_xscale("log")
        elif all(x.is_integer() for x in xs):  # ways and shots: no tick between two shot counts
            axes.set_xticks(sorted(set(xs)))
    order = sorted(range(len(points)), key=xs.__getitem__)
    axes.errorbar([xs[i] for i in order], [scale * points[i][1] for i in order],
                  yerr=[scale * points[i][2] for i in order], marker="o", capsize=3, label=f"test {metric} (95 % CI)")
    axes.plot([xs[i] for i in order], [scale * points[i][3] for i in order], marker="s", linestyle="--",
              label=f"best validation {metric}")
    axes.set(xlabel=key, ylabel=unit, title=f"{metric} against {key}")
    axes.legend(fontsize=8)
    return figure


def sweep_figures(found: list[tuple[Path, dict]], table: list[dict]) -> dict[str, Figure]:
    """A sweep's pictures by file name: the overlaid validation curves, and the scores against the swept setting
    when the sweep's protocols differ in exactly one (seeds pooled as in the report's ``table``)."""
    labels = _varied([protocol_overrides(run) + [f"seed={results.get('seed')}"] for run, results in found])
    runs = [(" ".join(label) or str(run.name), read_rows(run / METRICS)) for (run, _), label in zip(found, labels)
            if (run / METRICS).exists()]
    metric = table[0]["metric"]
    figures = {SWEEP_CURVES: sweep_curves_figure(runs, metric)}
    continual = continual_runs(found)
    if continual:
        figures[RETENTION] = retention_figure(continual, "class-incremental streams")
    varied = _varied([protocol_overrides(Path(row["runs"][0])) for row in table])
    if len(table) > 1 and all(len(v) == 1 for v in varied):
        key = varied[0][0].split("=", 1)[0]
        best_val = {str(run): results.get(f"best_val_{metric}") for run, results in found}
        points = []
        for row, (setting,) in zip(table, varied):
            vals = [best_val[run] for run in row["runs"] if best_val[run] is not None]
            points.append((setting.split("=", 1)[1], row["test"], row["ci95"],
                           sum(vals) / len(vals) if vals else float("nan")))
        figures[SWEEP_SCORES] = sweep_scores_figure(key, points, metric)
    return figures


def adaptation_figure(results: dict, title: str) -> Figure:
    """A meta-RL run's test return (± 95 % CI over tasks) at each stage of adaptation, and its regret where the
    family measures one, beside the reference policies' (bandits)."""
    stages = results["stages"]
    panels = [name for name in ("return", "regret", "success") if name in stages[0]]
    figure = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
    for axes, name in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        labels = [stage["stage"] for stage in stages]
        scale, label = _scale(name)
        axes.errorbar(range(len(labels)), [scale * stage[name][name] for stage in stages],
                      yerr=[scale * stage[name]["ci95"] for stage in stages], marker="o", capsize=3)
        if name == "regret":
            for reference, scored in results.get("references", {}).items():
                axes.axhline(scored["regret"], linestyle="--", color="gray")
                axes.annotate(f"{reference} {scored['regret']:.2f}", (0, scored["regret"]), fontsize=8)
        axes.set_xticks(range(len(labels)), labels, rotation=20)
        axes.set(ylabel=f"test {label}", title=f"{name} on {results['episodes']} test tasks")
    figure.suptitle(title)
    return figure


def continual_runs(found: list[tuple[Path, dict]]) -> list[tuple[str, dict]]:
    """The continual runs among ``found``, each labelled by its algorithm, steps and what sets it apart."""
    runs = [(run, results) for run, results in found if "continual" in results]
    names = [f"{results['algorithm']}, {results.get('steps')} steps" for _, results in runs]
    varied = _varied([protocol_overrides(run) + [f"seed={results.get('seed')}"] for run, results in runs])
    # What else sets a run apart is shown only where its algorithm and steps do not.
    return [(name if names.count(name) == 1 else " ".join([name, *label]), results)
            for name, label, (_, results) in zip(names, varied, runs)]


def retention_figure(runs: list[tuple[str, dict]], title: str) -> Figure:
    """Continual runs' retention (test images of all classes at a stream's end) and forgetting per class, ± 95 % CI
    over streams, against the stream's length in classes; one line a run, labelled."""
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    retention, forgetting = figure.subplots(1, 2)
    for label, results in runs:
        lengths = [entry["classes"] for entry in results["continual"]]
        for axes, name in ((retention, "accuracy"), (forgetting, "forgetting")):
            axes.errorbar(lengths, [100 * entry[name][name] for entry in results["continual"]],
                          yerr=[100 * entry[name]["ci95"] for entry in results["continual"]], marker="o", capsize=3,
                          label=label)
    anchor = next((results["expected"]["by_length"] for _, results in runs
                   if (results.get("expected") or {}).get("by_length")), None)
    if anchor:  # a paper's retention at each length, as the experiment's config gives it
        retention.plot([length for length, _ in anchor["values"]], [100 * value for _, value in anchor["values"]],
                       linestyle="--", color="gray", marker="x", label=anchor["label"])
    streams = runs[0][1]["task"]["streams"]
    retention.set(xscale="log", xlabel="classes in the stream", ylabel="retention: test accuracy at the end (%)",
                  title=f"after one online pass ({streams} streams a length)")
    forgetting.set(xscale="log", xlabel="classes in the stream", ylabel="forgetting per class (points)",
                   title="accuracy just after a class less at the end")
    retention.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def generation_figure(episode: dict[str, torch.Tensor], title: str) -> Figure:
    """One row a character: its conditioning images | generated | real held-out | unadapted generator's (images in
    [0, 1], ``[characters, n, C, H, W]``), strokes drawn dark on white."""
    parts = ("conditioning", "generated", "real", "unadapted")
    rows, columns = len(episode["generated"]), sum(episode[part].shape[1] for part in parts) + len(parts) - 1
    figure = Figure(figsize=(columns * 0.55, rows * 0.6 + 0.8), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for row in range(rows):
        column = 0
        for part in parts:
            for index, image in enumerate(episode[part][row]):
                axes = grid[row, column]
                axes.imshow(1 - image[0].numpy(), cmap="gray", vmin=0, vmax=1)
                if row == 0 and index == 0:
                    axes.set_title(part, fontsize=8, loc="left")
                column += 1
            column += 1  # a blank column between the parts
    for axes in grid.flat:
        axes.set_axis_off()
    figure.suptitle(title)
    return figure


def task_map_figure(points: torch.Tensor, labels: torch.Tensor, names: list[str], title: str, scored: dict) -> Figure:
    """Task embeddings projected to 2D (``[n, 2]``), one colour an alphabet (``labels`` index ``names``), with the
    nearest-neighbour purity against shuffled labels in the corner."""
    from matplotlib import colormaps

    figure = Figure(figsize=(11, 7), layout="constrained")
    axes = figure.subplots()
    colours = colormaps["tab20"].resampled(max(len(names), 1))
    markers = "os^Dv"  # more alphabets than tab20's colours: colour and marker together tell them apart
    for index, name in enumerate(names):
        chosen = labels == index
        axes.scatter(points[chosen, 0], points[chosen, 1], s=14, color=colours(index % 20),
                     marker=markers[index // 20 % len(markers)], label=name.replace("_", " "))
    shuffled = scored["shuffled"]
    axes.text(0.01, 0.99, f"nearest-neighbour alphabet purity {100 * scored['purity']:.1f} ± "
                          f"{100 * scored['ci95']:.1f} %\nshuffled labels {100 * shuffled['purity']:.1f} % "
                          f"(95 % within {100 * shuffled['range95'][0]:.1f}-{100 * shuffled['range95'][1]:.1f} %)",
              transform=axes.transAxes, va="top", fontsize=9, bbox={"facecolor": "white", "alpha": 0.8})
    axes.set(xlabel="first principal component", ylabel="second principal component", title=title)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="alphabet")
    return figure
