"""The benchmark scripts run end to end and report their figures as one JSON line (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120

COMMON_KEYS = {
    "benchmark",
    "steps_per_s",
    "goal",
    "goal_met",
    "loss_check",
    "torch",
    "pyro",
    "threads",
    "rounds",
    "steps",
    "warmup",
    "batch_size",
    "num_data",
    "data",
}
CASES = {
    "bench_vae_step.py": (
        "vae_step",
        {"ratio_vs_hand", "ratio_vs_hand_fused", "engine_vs_hand"},
        {"hand", "hand_fused", "pyro_svi", "pyro_dl", "engine_trace", "engine_meanfield", "engine_fit"},
    ),
    "bench_local_step.py": (
        "local_step",
        {"ratio_vs_hand_sparse", "ratio_vs_hand_sparse_fused", "engine_vs_hand_sparse"},
        {"hand_sparse", "hand_sparse_fused", "hand_dense", "hand_dense_fused", "engine_trace", "engine_meanfield",
         "fast_eager"},
    ),
}

EXTRA_ARGS = {"bench_local_step.py": ["--fast-path", "eager"]}  # no compile in the smoke test


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_quick_run_reports_json(script):
    name, ratio_keys, impls = CASES[script]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--simulated", *EXTRA_ARGS.get(script, [])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1])
    assert COMMON_KEYS | ratio_keys <= set(result), sorted(COMMON_KEYS | ratio_keys - set(result))
    assert result["benchmark"] == name
    assert result["data"] == "simulated"
    assert set(result["steps_per_s"]) == impls
    assert all(v > 0 for v in result["steps_per_s"].values())
    for key in ratio_keys:
        assert set(result[key]) <= impls
    # the hand-written step and the package's model + guide compute the same -ELBO from the same noise
    assert result["loss_check"]["rel_diff"] < 1e-5


@pytest.mark.slow
def test_evaluation_benchmark_quick_run_reports_json(shared_data):
    """bench_evaluate.py without compiling: the evaluator's IWAE agrees with the hand-written one (other draws:
    within 4 standard errors of the mean difference), and its last line is the JSON summary."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_evaluate.py"), "--quick", "--impls", "hand,evaluate"],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
        env={**os.environ, "PPL_MODELS_DATA": str(shared_data)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "evaluate" and set(result["images_per_s"]) == {"hand", "evaluate"}
    diff = result["mean_ll_diff_vs_first"]["evaluate"]
    assert abs(diff["mean"]) < 4 * diff["se"] + 1e-6


@pytest.mark.slow
def test_quality_benchmark_compares_the_main_job_with_plain_pytorch(shared_data, tmp_path):
    """A budget of a few steps (not seconds): both children train exactly that many, one evaluator scores both;
    the JSON's difference is the paired difference of the two NLLs it reports, over the images asked for."""
    out = tmp_path / "quality.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_quality.py"), "--max-steps", "20", "--num-samples", "5",
         "--num-test", "40", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PPL_MODELS_DATA": str(shared_data)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["num_test"] == 40 and result["num_samples"] == 5 and result["max_steps"] == 20
    assert result["steps_engine"] == result["steps_hand"] == 20
    assert result["diff"] == pytest.approx(result["nll_engine"] - result["nll_hand"], abs=2e-3)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
