"""scripts/bench.py runs on the real data and writes the JSON the performance issue asks for (no timing asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_bench_writes_a_complete_json(omniglot_root, tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--algos", "protonet", "maml_second_order", "--vectorize", "auto",
                           "false", "--set", "trainer.meta_batch=2", "--steps", "1", "--warmup", "1",
                           "--profile", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "METACLI_DATA": str(omniglot_root)})
    assert done.returncode == 0, done.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    report = json.loads(report_file.read_text())
    results = report["results"]
    assert [(r["algo"], r["vectorize"]) for r in results] == [
        ("protonet", None), ("maml_second_order", "auto"), ("maml_second_order", "false")]
    for r in results:
        assert r["meta_batch"] == 2 and r["tasks_per_second"] > 0
        assert r["configured_steps"] == 1000  # the default; the minutes follow from it at the measured pace
        assert r["training_minutes_at_configured_steps"] == pytest.approx(1000 * r["seconds_per_meta_iteration"] / 60)
        assert set(r["breakdown_seconds"]) == {"sampling", "inner_loop", "outer_backward", "optimizer"}
        assert sum(r["breakdown_seconds"].values()) <= r["seconds_per_meta_iteration"] * 1.5
        assert 0 <= r["sampling_fraction"] < 1
        assert r["flops_per_meta_iteration"] > 1e8 and 0 < r["achieved_gflops"] and r["matmul_gflops"] > 0
        assert r["precision"] == "fp32"
        # task_threads=auto: one worker per intra-op thread on the CPU.
        assert r["threads"]["task_threads"] == r["threads"]["intra_op_threads"] == report["threads"]
        assert r["peak_memory_bytes"] >= 0 and r["minor_page_faults_per_step"] >= 0
        assert len(r["top_ops"]) == 3 and r["top_ops"][0]["op"].startswith("aten::")
        assert r["top_ops"][0]["self_ms"] >= r["top_ops"][2]["self_ms"] > 0
        assert 0 < sum(op["share_of_self_time"] for op in r["top_ops"]) <= 1
    # FLOPs are counted on the serial path, so both execution paths report the same arithmetic.
    assert results[1]["flops_per_meta_iteration"] == results[2]["flops_per_meta_iteration"]


def test_bench_times_one_and_two_processes(omniglot_root, tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--algos", "maml_second_order", "--processes", "1", "2",
                           "--set", "trainer.meta_batch=2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "METACLI_DATA": str(omniglot_root)})
    assert done.returncode == 0, done.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    one, two = json.loads(report_file.read_text())["results"]
    assert (one["processes"], two["processes"]) == (1, 2) and one["tasks_per_second"] > 0 < two["tasks_per_second"]
    assert "processes=2" in done.stdout and one["flops_per_meta_iteration"] == two["flops_per_meta_iteration"]


def test_bench_reports_bad_input_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--algos", "protonet", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "METACLI_DATA": str(tmp_path / "no-data")})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "bench.py: error: Omniglot not found" in done.stderr and "dataset.download=true" in done.stderr
    assert not list(tmp_path.glob("bench-*.json"))


def test_the_loader_bench_times_both_loaders_on_the_same_episodes(omniglot_root, tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--loaders", "--steps", "2", "--rounds", "1", "--out",
                           str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "METACLI_DATA": str(omniglot_root)})
    assert done.returncode == 0, done.stderr
    report = json.loads(next(tmp_path.glob("bench-loaders-*.json")).read_text())
    assert report["same_episodes"] is True and report["batches_timed"] == 2 and len(report["rounds"]) == 1
    assert report["speedup"] == (report["batch_meta_data_loader_episodes_per_second"]
                                 / report["per_image_loader_episodes_per_second"])


def test_the_meta_rl_bench_splits_an_iteration_between_simulator_policy_and_learner(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--meta-rl", "pretrained_rl_point_nav", "rl2_bandit_k5_n100",
                           "--steps", "1", "--warmup", "0", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("bench-meta-rl-*.json")).read_text())
    point_nav, bandit = report["results"]
    # The papers' batches: 20 goals x 20 trajectories x 100 steps; 250 bandits x 100 pulls.
    assert point_nav["environment_steps_per_meta_iteration"] == 40_000
    assert bandit["environment_steps_per_meta_iteration"] == 25_000
    for result in report["results"]:
        split = result["time_split"]
        assert all(0 < share < 1 for share in split.values()) and abs(sum(split.values()) - 1) < 1e-9
        assert result["meta_iterations_per_second"] > 0
