"""Meta-training throughput and peak memory on real data: one JSON file per run.

    python scripts/bench.py                       # ProtoNet, MAML (1st/2nd order) on Omniglot 5-way 1-shot, CPU
    python scripts/bench.py --device cuda --algos maml --steps 20 --out bench-results/

Each configuration runs in its own subprocess, so peak memory (max RSS on CPU, max allocated on CUDA) is its own.
Episodes come from the real dataset through the same sampler as training; configs are composed from conf/ exactly
as `metacli train` composes them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "protonet": ["algo=protonet"],
    "maml_first_order": ["algo=maml", "algo.first_order=true"],
    "maml_second_order": ["algo=maml", "algo.first_order=false"],
}


def measure(case: str, overrides: list[str], device: str, steps: int, warmup: int) -> dict:
    """Time ``steps`` meta-iterations after ``warmup`` ones, in this process."""
    import hydra
    import torch

    from metacli.build import build, build_dataset, build_learner, resolve_device
    from metacli.cli import config_dir
    from metacli.config_schema import register
    from metacli.data.episodes import EpisodeSampler

    register()
    with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra.compose("train", overrides=[*overrides, f"device={device}"])
    torch.manual_seed(0)
    device_t = resolve_device(cfg.device)
    dataset = build_dataset(cfg)
    learner = build_learner(cfg, dataset).to(device_t)
    optimizer = build(cfg.trainer.optimizer, "trainer.optimizer")(learner.parameters())
    sampler = EpisodeSampler(dataset.split("train"), cfg.task.n_way, cfg.task.k_shot, cfg.task.n_query,
                             dataset.normalize, device_t)
    generator = torch.Generator().manual_seed(0)
    meta_batch = cfg.trainer.meta_batch
    sync = torch.cuda.synchronize if device_t.type == "cuda" else (lambda: None)

    def step() -> float:
        start = time.perf_counter()
        batch = sampler.sample(meta_batch, generator)
        sync()
        sampled = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        learner.meta_train_step(batch)
        optimizer.step()
        sync()
        return sampled - start

    for _ in range(warmup):
        step()
    if device_t.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, sampling = time.perf_counter(), 0.0
    for _ in range(steps):
        sampling += step()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device_t.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"case": case, "overrides": overrides, "device": str(device_t), "meta_batch": meta_batch,
            "steps_timed": steps, "seconds_per_meta_iteration": elapsed / steps,
            "episodes_per_second": steps * meta_batch / elapsed, "sampling_fraction": sampling / elapsed,
            "peak_memory_bytes": peak, "peak_memory_kind": "cuda_max_allocated" if device_t.type == "cuda" else "max_rss"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--dataset", default="omniglot", help="dataset config (omniglot, mini_imagenet, synthetic)")
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="bench-results", help="folder for the JSON file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one case in this process
    args = parser.parse_args()
    common = [f"dataset={args.dataset}", f"backbone={args.backbone}", "task.n_way=5", "task.k_shot=1",
              "task.n_query=15", f"trainer.meta_batch={args.meta_batch}"]
    if args.one:
        print(json.dumps(measure(args.one, CASES[args.one] + common, args.device, args.steps, args.warmup)))
        return
    results = []
    for case in args.algos:
        done = subprocess.run([sys.executable, __file__, "--one", case, *sys.argv[1:]], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench of {case} failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{case:20s} {r['episodes_per_second']:8.1f} episodes/s  {1000 * r['seconds_per_meta_iteration']:8.1f} ms/it"
              f"  sampling {100 * r['sampling_fraction']:.1f}%  peak {r['peak_memory_bytes'] / 2**20:.0f} MiB")
    import torch

    report = {"dataset": args.dataset, "backbone": args.backbone, "task": "5-way 1-shot, 15 queries",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{args.dataset}-{args.backbone}-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
