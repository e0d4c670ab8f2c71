"""Meta-training throughput, step-time breakdown, FLOP rate and peak memory on real data: one JSON file per run.

    python scripts/bench.py                                   # ProtoNet and MAML on MAML's Omniglot network
    python scripts/bench.py --algos maml_second_order anil meta_sgd reptile leo lstm_meta_learner
    python scripts/bench.py --setups omniglot_conv4 miniimagenet_conv4_32 --algos protonet maml_first_order
    python scripts/bench.py --setups omniglot_conv4 --algos protonet matching_net siamese relation_net snail mann baseline
    python scripts/bench.py --device cuda --vectorize true false --out bench-results/
    python scripts/bench.py --memory-sweep                    # MAML 2nd order at 1/5/10/20 inner steps, +- checkpointing
    python scripts/bench.py --peer-python /path/to/venv/bin/python   # learn2learn on the same shapes, same run
    python scripts/bench.py --loaders --steps 20                # metacli.torchmeta's loader against a per-image one
    python scripts/bench.py --meta-rl --steps 5                 # MAML-RL (both curvatures) and RL² at the papers' batches
    python scripts/bench.py --processes 1 2 --algos maml_second_order protonet reptile   # 1 vs 2 torchrun processes

Each measurement runs in its own subprocess, so its peak memory is its own: on CUDA the peak allocated during the
timed steps, on CPU the growth of max RSS over the process's size before the first step. Episodes come from the
real dataset through the training sampler; configs are composed from conf/ as ``metacli train`` composes them.
With ``--processes P`` a case runs under torchrun, its meta-batch shared by P processes of cpu_count / P threads each
(:mod:`metacli.execution.processes`), and the first process reports; peak memory is then that process's.
FLOPs of one meta-iteration are counted by ``torch.utils.flop_counter`` (convolutions and matmuls, forward and every
backward) and divided by the measured time; the machine's dense matmul rate is measured in the same run, in the
run's precision (fp32, or bf16 with trainer.precision=bf16).
"""
from __future__ import annotations

import argparse
import dataclasses
from functools import partial
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASK = ["task.n_way=5", "task.k_shot=1", "task.n_query=15"]
SETUPS = {  # the shapes of the papers' protocols; meta-batch 32 on Omniglot as in MAML, 4 on mini-ImageNet
    "omniglot_conv4_stride": ["dataset=omniglot", "backbone=conv4_stride", "trainer.meta_batch=32"],
    "omniglot_conv4": ["dataset=omniglot", "backbone=conv4", "trainer.meta_batch=32"],
    # Each algorithm's own defaults (meta-batch, steps) on Omniglot: what `metacli train algo=X` runs.
    "omniglot_defaults": ["dataset=omniglot"],
    "miniimagenet_conv4_32": ["dataset=mini_imagenet", "backbone=conv4", "backbone.hidden=32",
                              "trainer.meta_batch=4"],
    "miniimagenet_resnet12": ["dataset=mini_imagenet", "backbone=resnet12", "trainer.meta_batch=4"],
}
ALGOS = {  # MAML and ANIL take one inner step on every setup (mini-ImageNet's defaults take five: conf/algo_on_dataset/)
    "protonet": ["algo=protonet"],
    "maml_first_order": ["algo=maml", "algo.first_order=true", "algo.inner_steps=1"],
    "maml_second_order": ["algo=maml", "algo.first_order=false", "algo.inner_steps=1"],
    "anil": ["algo=anil", "algo.inner_steps=1"],
    "meta_sgd": ["algo=meta_sgd"],
    "reptile": ["algo=reptile"],
    "leo": ["algo=leo"],
    "lstm_meta_learner": ["algo=lstm_meta_learner"],
    "matching_net": ["algo=matching_net"],
    "matching_net_fce": ["algo=matching_net", "algo.fce=true"],
    "siamese": ["algo=siamese"],
    "relation_net": ["algo=relation_net"],
    "snail": ["algo=snail"],
    "mann": ["algo=mann"],
    # Non-episodic: one step is a mini-batch of as many images as a 5-way 1-shot meta-batch of 32 holds.
    "baseline": ["algo=baseline", "trainer.batch_size=2560"],
    "baseline_plus_plus": ["algo=baseline", "algo.head=cosine", "trainer.batch_size=2560"],
}
VECTORIZABLE = ("maml_first_order", "maml_second_order", "anil", "meta_sgd")


def matmul_gflops(device, dtype) -> float:
    """Best dense matmul rate of a few 2048x2048 products in ``dtype``: the yardstick for achieved GFLOP/s."""
    import torch

    a, b = (torch.randn(2048, 2048, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * 2048 ** 3 / best / 1e9


def measure(case: dict, device: str, steps: int, warmup: int, split: str, profile: int = 0) -> dict:
    """Time ``steps`` meta-iterations after ``warmup`` ones, in this process."""
    import hydra
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from metacli.build import (build_dataset, build_execution, build_learner, build_partial, resolve_device,
                               training_batches)
    from metacli.config_schema import config_dir, register
    from metacli.execution import processes
    from metacli.execution.meta_batch import capture_for, meta_train_step
    from metacli.execution.precision import training_precision
    from metacli.execution.ranks import from_environment
    from metacli.execution.settings import Execution
    from metacli.execution.task_threads import thread_layout
    from metacli.execution.timing import timed_phases
    from metacli.models.kernels import coordinate_lstm, pooled_product
    from metacli.reliability.host_memory import retain_freed_memory

    register()
    with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra.compose("train", overrides=[*case["overrides"], f"device={device}"])
    if cfg.trainer.retain_host_memory:
        retain_freed_memory()
    torch.manual_seed(0)
    device_t = resolve_device(cfg.device)
    group = from_environment()
    if group.many:
        device_t = processes.join(group, device_t)
    dataset = build_dataset(cfg)
    learner = build_learner(cfg, dataset).to(device_t)
    execution = build_execution(cfg)
    captured = capture_for(learner, execution)
    optimizer = build_partial(cfg.trainer.optimizer, "trainer.optimizer", learner.parameters())
    next_batch = training_batches(cfg, learner, dataset, device_t, split)
    generator = torch.Generator().manual_seed(0)
    episodic = learner.training_data == "episodes"
    per_step, unit = (cfg.trainer.meta_batch, "tasks") if episodic else (cfg.trainer.batch_size, "images")
    sync = torch.cuda.synchronize if device_t.type == "cuda" else (lambda: None)

    def step(phases: dict, execution: Execution = execution) -> None:
        sync()
        start = time.perf_counter()
        batch = next_batch(generator)
        sync()
        phases["sampling"] += time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        with training_precision(cfg.trainer.precision, device_t):
            if group.many:
                processes.meta_train_step_across(learner, batch, partial(meta_train_step, execution=execution,
                                                                         captured=captured), group)
            else:
                meta_train_step(learner, batch, execution, captured)
        sync()
        start = time.perf_counter()
        optimizer.step()
        sync()
        phases["optimizer"] += time.perf_counter() - start

    if device_t.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated()
    else:
        base_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with timed_phases(device_t) as phases:
        for _ in range(warmup):
            step(phases)
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with timed_phases(device_t) as phases:
        for _ in range(steps):
            start = time.perf_counter()
            step(phases)
            times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    if device_t.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_memory
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_memory
    top_ops = profile_step(step, execution, device_t, profile) if profile else None
    threads = thread_layout(learner, execution)
    # Count in this thread, the only one the counter sees, and on the serial path: the same arithmetic, no vmap
    # under the counter.
    serial = Execution(vectorize=False, batch_first_step=False, task_threads=1)
    # The native kernels are invisible to the counter: count their PyTorch twins instead.
    with FlopCounterMode(display=False) as counter, training_precision(cfg.trainer.precision, device_t), \
            pooled_product.disabled(), coordinate_lstm.disabled():
        meta_train_step(learner, next_batch(generator), serial)
    seconds = statistics.median(times)
    flops = counter.get_total_flops()
    matmul_dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    return {**case, "device": str(device_t), "episodes_from_split": split, "steps_timed": steps,
            "meta_batch" if episodic else "batch_size": per_step,
            "seconds_per_meta_iteration": seconds, f"{unit}_per_second": per_step / seconds,
            # Meta-training alone, at this pace: validation and the test come on top.
            "configured_steps": cfg.trainer.steps,
            "training_minutes_at_configured_steps": cfg.trainer.steps * seconds / 60,
            "breakdown_seconds": {k: v / steps for k, v in sorted(phases.items())},
            "sampling_fraction": phases["sampling"] / sum(times),
            "flops_per_meta_iteration": flops, "achieved_gflops": flops / seconds / 1e9,
            "precision": cfg.trainer.precision, "threads": threads, "processes": group.size,
            "matmul_gflops": matmul_gflops(device_t, matmul_dtype),
            "peak_memory_bytes": peak, "minor_page_faults_per_step": faults / steps,
            "peak_memory_kind": "cuda_max_allocated_over_start" if device_t.type == "cuda" else "max_rss_growth",
            **({"top_ops": top_ops} if top_ops is not None else {})}


def profile_step(step, execution, device, count: int) -> list[dict]:
    """The ``count`` operators with the most self time in one more meta-iteration under ``torch.profiler``, by
    operator and input shapes, so that a JSON says where the time went.

    The profiler does not see threads started before it, so a learner with task threads runs this iteration on
    the calling thread alone.
    """
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step(defaultdict(float), dataclasses.replace(execution, task_threads=1))
    events = prof.key_averages(group_by_input_shape=True)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    return [{"op": e.key, "input_shapes": str(e.input_shapes), "calls": e.count,
             "self_ms": getattr(e, key) / 1000,
             "share_of_self_time": getattr(e, key) / total}
            for e in sorted(events, key=lambda e: -getattr(e, key))[:count]]


PEER_SCRIPT = r"""
import json, sys, time, torch, learn2learn as l2l
torch.manual_seed(0)
meta_batch, inner_steps, first_order = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
bf16 = sys.argv[5] == "bf16"  # the same autocast as metacli's trainer.precision=bf16
model = l2l.vision.models.OmniglotCNN(output_size=5)  # 4 x (conv3x3 stride 2, 64, BatchNorm, ReLU), linear head
maml = l2l.algorithms.MAML(model, lr=0.4, first_order=first_order)
optimizer = torch.optim.Adam(maml.parameters(), 1e-3)
loss = torch.nn.CrossEntropyLoss()
support_x, support_y = torch.rand(5, 1, 28, 28), torch.arange(5)
query_x, query_y = torch.rand(75, 1, 28, 28), torch.arange(5).repeat(15)
def iteration():
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tasks()
    optimizer.step()
def tasks():
    for _ in range(meta_batch):
        task = maml.clone()
        for _ in range(inner_steps):
            task.adapt(loss(task(support_x), support_y))
        (loss(task(query_x), query_y) / meta_batch).backward()
iteration()
times = []
for _ in range(int(sys.argv[4])):
    start = time.perf_counter(); iteration(); times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"seconds_per_meta_iteration": times[len(times) // 2]}))
"""


def measure_peer(python: str, meta_batch: int, inner_steps: int, first_order: bool, steps: int,
                 precision: str) -> dict:
    """learn2learn 0.2.0's ``MAML.clone()/adapt()`` on MAML's Omniglot shapes (random pixels), in its own venv,
    under the same autocast as metacli's ``precision``."""
    done = subprocess.run([python, "-c", PEER_SCRIPT, str(meta_batch), str(inner_steps), str(int(first_order)),
                           str(steps), precision], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"learn2learn timing failed:\n{done.stderr[-2000:]}")
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_meta_iteration"]
    return {"seconds_per_meta_iteration": seconds, "tasks_per_second": meta_batch / seconds}


def cases(args) -> list[dict]:
    """The measurements the arguments ask for, each with the overrides that compose its config."""
    if args.memory_sweep:
        return [{"setup": "omniglot_conv4_stride", "algo": "maml_second_order", "vectorize": args.vectorize[0],
                 "inner_steps": steps, "checkpoint_inner": ckpt,
                 "overrides": [*SETUPS["omniglot_conv4_stride"], *TASK, *ALGOS["maml_second_order"],
                               f"algo.inner_steps={steps}", f"execution.checkpoint_inner={str(ckpt).lower()}",
                               f"execution.vectorize={args.vectorize[0]}", "trainer.meta_batch=8"]}
                for ckpt in (False, True) for steps in (1, 5, 10, 20)]
    out = []
    for setup in args.setups:
        for algo in args.algos:
            for vectorize in (args.vectorize if algo in VECTORIZABLE else [None]):
                overrides = [*SETUPS[setup], *TASK, *ALGOS[algo], *args.set]
                if vectorize is not None:
                    overrides.append(f"execution.vectorize={vectorize}")
                out += [{"setup": setup, "algo": algo, "vectorize": vectorize, "overrides": overrides,
                         "processes": count} for count in args.processes]
    return out


def summary_line(r: dict) -> str:
    parts = " ".join(f"{k} {1000 * v:.0f}" for k, v in r["breakdown_seconds"].items())
    tag = f"{r['setup']} {r['algo']}" + (f" vectorize={r['vectorize']}" if r.get("vectorize") is not None else "")
    tag += f" steps={r['inner_steps']} ckpt={r['checkpoint_inner']}" if "inner_steps" in r else ""
    tag += f" {r['precision']}" if r["precision"] != "fp32" else ""
    tag += f" processes={r['processes']}" if r["processes"] > 1 else ""
    peer = (f"  learn2learn {r['peer']['tasks_per_second']:.1f} tasks/s ({r['speedup_vs_peer']:.2f}x; "
            f"{r['compute_only_speedup_vs_peer']:.2f}x without sampling)" if "peer" in r else "")
    unit = "tasks" if "tasks_per_second" in r else "images"
    return (f"{tag:55s} {r[unit + '_per_second']:7.2f} {unit}/s {1000 * r['seconds_per_meta_iteration']:8.0f} ms/it "
            f"[{parts} ms] {r['achieved_gflops']:5.1f}/{r['matmul_gflops']:.0f} GFLOP/s "
            f"sampling {100 * r['sampling_fraction']:.1f}% peak +{r['peak_memory_bytes'] / 2**20:.0f} MiB "
            f"faults/step {r['minor_page_faults_per_step']:.0f}{peer}")


def measure_loaders(batches: int, rounds: int) -> dict:
    """Episodes a second of metacli.torchmeta's BatchMetaDataLoader (one gather a batch) against the loader
    torchmeta itself runs (a DataLoader calling ``dataset[task]``, each image through the PIL transforms), both at
    ``num_workers=0`` on torchmeta's README tasks (Omniglot 5-way 5-shot, 15 test images, 16 a batch), drawing the
    same episodes from the same seeds; the median of ``rounds`` alternating rounds."""
    import torch
    from torch.utils.data import DataLoader

    from metacli.torchmeta.datasets.helpers import omniglot
    from metacli.torchmeta.utils.data import BatchMetaDataLoader, CombinationRandomSampler, collate_tasks

    dataset = omniglot(None, ways=5, shots=5, test_shots=15, meta_train=True, seed=0)

    class PerImage(torch.utils.data.Dataset):  # the same tasks without the batched fetch
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, task):
            return dataset[task]

    def gathered():
        return BatchMetaDataLoader(dataset, batch_size=16, generator=torch.Generator().manual_seed(0))

    def per_image():
        sampler = CombinationRandomSampler(dataset, torch.Generator().manual_seed(0))
        return DataLoader(PerImage(), batch_size=16, sampler=sampler, collate_fn=collate_tasks)

    def episodes_per_second(loader) -> float:
        start = time.perf_counter()
        for _, _batch in zip(range(batches), loader):
            pass
        return 16 * batches / (time.perf_counter() - start)

    first, second = next(iter(gathered())), next(iter(per_image()))
    same = all(torch.equal(first[k][i], second[k][i]) for k in ("train", "test") for i in (0, 1))
    timings = [(episodes_per_second(gathered()), episodes_per_second(per_image())) for _ in range(rounds)]
    ours = sorted(t[0] for t in timings)[len(timings) // 2]
    peer = sorted(t[1] for t in timings)[len(timings) // 2]
    return {"task": "Omniglot 5-way 5-shot, 15 test images a class, 16 tasks a batch, num_workers=0",
            "batches_timed": batches, "rounds": [list(t) for t in timings], "same_episodes": same,
            "batch_meta_data_loader_episodes_per_second": ours, "per_image_loader_episodes_per_second": peer,
            "speedup": ours / peer}


META_RL = {  # the papers' batches: MAML's 20 tasks x 20 trajectories x 100 steps, RL²'s 250 bandits x 100 pulls
    "maml_rl_point_nav": ["experiment=maml_rl_point_nav"],
    "maml_rl_point_nav_inner_loop_curvature": ["experiment=maml_rl_point_nav", "algo.curvature=inner_loop"],
    "pretrained_rl_point_nav": ["experiment=maml_rl_point_nav", "algo=pretrained_rl"],
    "rl2_bandit_k5_n100": ["experiment=rl2_bandit_k5_n100"],
    "maml_rl_half_cheetah_vel": ["experiment=maml_rl_half_cheetah_vel"],  # 40 x 20 x 200, MuJoCo in 2 processes
}


def measure_meta_rl(name: str, steps: int, warmup: int) -> dict:
    """Meta-iterations a second of a meta-RL protocol, and where the time goes: the simulator (the vector
    environment's ``step``), the policy (the rest of the rollouts: acting and sampling) and the learner (everything
    else: advantages, adaptation, the outer update)."""
    import hydra
    import torch

    import metacli.algorithms.meta_rl as meta_rl
    import metacli.algorithms.rl2 as rl2
    from metacli.build import build_dataset, build_learner, build_partial, training_batches
    from metacli.config_schema import config_dir, register

    register()
    with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra.compose("train", overrides=[*META_RL[name], "device=cpu"])
    torch.manual_seed(0)
    family = build_dataset(cfg)
    learner = build_learner(cfg, family)
    optimizer = (build_partial(cfg.trainer.optimizer, "trainer.optimizer", learner.parameters())
                 if learner.uses_optimizer else None)
    next_batch = training_batches(cfg, learner, family, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    seconds = {"simulator": 0.0, "rollouts": 0.0}
    env_class = type(family.vector_env(1))
    original_step = env_class.step

    def timed_step(env, actions):
        start = time.perf_counter()
        try:
            return original_step(env, actions)
        finally:
            seconds["simulator"] += time.perf_counter() - start

    def timed_rollout(original):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds["rollouts"] += time.perf_counter() - start
        return run

    env_class.step = timed_step
    for module in (meta_rl, rl2):  # where the learners call rollout()
        module.rollout = timed_rollout(module.rollout)
    for _ in range(warmup):
        learner.meta_update(next_batch(generator), optimizer)
    seconds.update(simulator=0.0, rollouts=0.0)
    start = time.perf_counter()
    for _ in range(steps):
        learner.meta_update(next_batch(generator), optimizer)
    total = time.perf_counter() - start
    split = {"simulator": seconds["simulator"] / total, "policy": (seconds["rollouts"] - seconds["simulator"]) / total,
             "learner": 1 - seconds["rollouts"] / total}
    env_steps = cfg.trainer.meta_batch * family.trajectories * family.horizon * getattr(learner, "inner_steps", 0) + \
        cfg.trainer.meta_batch * family.trajectories * family.horizon * getattr(learner, "episodes_per_trial", 1)
    return {"protocol": name, "overrides": META_RL[name], "meta_batch": cfg.trainer.meta_batch,
            "trajectories_per_task": family.trajectories, "horizon": family.horizon, "steps_timed": steps,
            "seconds_per_meta_iteration": total / steps, "meta_iterations_per_second": steps / total,
            "environment_steps_per_meta_iteration": env_steps, "time_split": split,
            "minutes_for_500_meta_iterations": 500 * total / steps / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=["omniglot_conv4_stride"], choices=list(SETUPS))
    parser.add_argument("--algos", nargs="+", default=["protonet", "maml_first_order", "maml_second_order"],
                        choices=list(ALGOS))
    parser.add_argument("--device", default="cpu", help="device config: cpu, cuda or auto")
    parser.add_argument("--vectorize", nargs="+", default=["auto"], choices=["auto", "true", "false"],
                        help="execution.vectorize values to measure for the MAML family")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every case")
    parser.add_argument("--memory-sweep", action="store_true",
                        help="MAML 2nd order, meta-batch 8, at 1/5/10/20 inner steps, with and without checkpointing")
    parser.add_argument("--peer-python", help="python of a venv with learn2learn 0.2.0: time it side by side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating metacli/peer rounds (with --peer-python)")
    parser.add_argument("--steps", type=int, default=5, help="timed meta-iterations per case (median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--split", default="train", choices=["train", "val", "test"],
                        help="split the episodes come from (same shapes; val needs only the smaller archive)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more meta-iteration and add its N costliest operators to the JSON")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON file")
    parser.add_argument("--loaders", action="store_true",
                        help="metacli.torchmeta's BatchMetaDataLoader against a per-image torchmeta-style loader")
    parser.add_argument("--meta-rl", nargs="*", choices=list(META_RL), metavar="PROTOCOL",
                        help=f"meta-RL protocols at the papers' batches (all when none is named): {', '.join(META_RL)}")
    parser.add_argument("--processes", nargs="+", type=int, default=[1],
                        help="run each case as this many torchrun processes sharing the meta-batch (CPU: gloo)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one case (JSON) in this process
    args = parser.parse_args()
    if args.one:
        from metacli.errors import MetacliError

        from metacli.execution.ranks import from_environment

        try:
            result = measure(json.loads(args.one), args.device, args.steps, args.warmup, args.split, args.profile)
            if from_environment().leader:
                print(json.dumps(result))
        except MetacliError as error:  # bad input (no CUDA, a missing dataset): its one line, no traceback
            sys.exit(f"bench.py: error: {error}")
        return
    if args.meta_rl is not None:
        import torch

        report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
                  "results": []}
        for name in args.meta_rl or list(META_RL):
            result = measure_meta_rl(name, args.steps, args.warmup)
            split = result["time_split"]
            print(f"{name:45s} {result['meta_iterations_per_second']:6.2f} meta-iterations/s "
                  f"(500 in {result['minutes_for_500_meta_iterations']:.1f} min): simulator "
                  f"{100 * split['simulator']:.1f} %, policy {100 * split['policy']:.1f} %, learner "
                  f"{100 * split['learner']:.1f} %", flush=True)
            report["results"].append(result)
        return write_report(report, args.out, "meta-rl", args.device)
    if args.loaders:
        report = measure_loaders(args.steps, args.rounds)
        print(f"BatchMetaDataLoader {report['batch_meta_data_loader_episodes_per_second']:.0f} episodes/s, per-image "
              f"loader {report['per_image_loader_episodes_per_second']:.0f} ({report['speedup']:.1f}x; same episodes: "
              f"{report['same_episodes']})")
        return write_report(report, args.out, "loaders", args.device)
    results = []
    for case in cases(args):
        with_peer = (args.peer_python and case["setup"] == "omniglot_conv4_stride" and case["algo"] in VECTORIZABLE
                     and "inner_steps" not in case)
        rounds = []
        # On a shared machine the speed drifts by tens of percent within minutes: alternate metacli and the peer
        # and keep the median round of each, so that the ratio compares like with like.
        for _ in range(args.rounds if with_peer else 1):
            many = case.get("processes", 1) > 1
            launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={case['processes']}"] if many else [sys.executable])
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // case["processes"]))} if many else None
            done = subprocess.run([*launch, __file__, "--one", json.dumps(case), "--device", args.device,
                                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--split", args.split,
                                   "--profile", str(args.profile)],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"bench of {case['setup']} {case['algo']} failed:\n{done.stderr[-3000:].strip()}")
            ours = json.loads(done.stdout.strip().splitlines()[-1])
            peer = (measure_peer(args.peer_python, ours["meta_batch"], 1, case["algo"] == "maml_first_order",
                                 args.steps, ours["precision"]) if with_peer else None)
            rounds.append((ours, peer))
        # Slowest first, i.e. by throughput, which is tasks/s or images/s depending on the learner.
        result = sorted(rounds, key=lambda r: -r[0]["seconds_per_meta_iteration"])[len(rounds) // 2][0]
        if with_peer:
            peers = sorted(p["tasks_per_second"] for _, p in rounds)
            result["peer"] = {"library": "learn2learn 0.2.0", "tasks_per_second": peers[len(peers) // 2],
                              "rounds": [[o["tasks_per_second"], p["tasks_per_second"]] for o, p in rounds]}
            result["speedup_vs_peer"] = result["tasks_per_second"] / result["peer"]["tasks_per_second"]
            # The peer reuses one episode already in memory and samples nothing; the setup times compute
            # only. So also compare without metacli's sampling of real episodes.
            compute = result["seconds_per_meta_iteration"] - result["breakdown_seconds"]["sampling"]
            result["compute_only_tasks_per_second"] = result["meta_batch"] / compute
            result["compute_only_speedup_vs_peer"] = (result["compute_only_tasks_per_second"]
                                                      / result["peer"]["tasks_per_second"])
        results.append(result)
        print(summary_line(result), flush=True)
    import torch

    report = {"task": "5-way 1-shot, 15 queries", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "results": results}
    kind = "memory" if args.memory_sweep else "-".join(args.setups) if len(args.setups) < 3 else "suite"
    write_report(report, args.out, kind, args.device)


def write_report(report: dict, folder: str, kind: str, device: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{kind}-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
