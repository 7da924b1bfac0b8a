"""The benchmark scripts, run end to end with tiny smoke settings so they cannot silently rot."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is not an installed package: its scripts run from the repository root.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import quality_ablation, step_cost  # noqa: E402
from benchmarks.common import prepare_phantom  # noqa: E402
from benchmarks.measure import PeakMemory  # noqa: E402
from benchmarks.step_worker import METHODS, WorkerSpec, run_isolated  # noqa: E402
TINY = ["--preset", "smoke", "--threads", "1"]


@pytest.fixture(scope="module")
def step_cost_out(tmp_path_factory):
    """Output folder of one tiny step-cost run with every method, a two-point sweep and the loader."""
    out = tmp_path_factory.mktemp("step_cost")
    status = step_cost.main(TINY + ["--micro-batch", "2", "--accumulation", "2", "--repeats", "1", "--isolation",
                                    "none", "--sweep-k", "1,2", "--sweep-micro-batch", "2", "--loader-workers", "0",
                                    "--loader-batches", "2", "--out", str(out)])
    assert status == 0
    return out


def test_step_cost_times_every_method(step_cost_out):
    table = pd.read_csv(step_cost_out / "step_cost.csv")
    assert list(table["method"]) == list(METHODS)
    assert (table["wall_s"] > 0).all()
    assert table.loc[table["method"] == "floor", "wall_x_floor"].item() == pytest.approx(1.0)
    assert table.loc[table["method"] == "clip", "wall_x_clip"].item() == pytest.approx(1.0)


def test_step_cost_clip_uses_one_batch(step_cost_out):
    table = pd.read_csv(step_cost_out / "step_cost.csv").set_index("method")
    assert table.loc["clip", "b"] == 4
    assert table.loc["clip", "k"] == 1
    assert table.loc["momentum", "b"] == 2
    assert table.loc["momentum", "k"] == 2


def test_memory_sweep_rows_and_plot(step_cost_out):
    sweep = pd.read_csv(step_cost_out / "memory_sweep.csv")
    assert sorted(zip(sweep["method"], sweep["k"])) == [("clip", 1), ("clip", 2), ("momentum", 1), ("momentum", 2)]
    assert sweep.loc[sweep["method"] == "clip", "B"].tolist() == [2, 4]
    assert (sweep.loc[sweep["k"] == 1, "step_x_k_min"] == 1.0).all()
    assert (step_cost_out / "memory_vs_accumulation.png").stat().st_size > 0


def test_loader_compared_with_step(step_cost_out):
    loader = pd.read_csv(step_cost_out / "loader.csv")
    assert loader["workers"].tolist() == [0]
    assert (loader["samples_per_s"] > 0).all()
    assert "loader / step" in loader.columns


def test_step_cost_records_load(step_cost_out):
    tables = (step_cost_out / "tables.md").read_text()
    assert "load_average_after" in tables
    assert "torch_threads" in tables


def test_isolated_worker_measures_memory(tmp_path):
    manifest = prepare_phantom(tmp_path / "phantom", 64, 64)
    spec = WorkerSpec(method="momentum", preset="smoke", manifest=str(manifest), micro_batch_size=2,
                      accumulation_steps=2, repeats=1, threads=1)

    record = run_isolated(spec, timeout=300)

    assert record["out_of_memory"] is False
    assert len(record["step_times_s"]) == 1
    assert record["base_mb"] > 0
    assert record["peak_mb"] >= record["base_mb"]
    assert math.isfinite(record["last_value"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak")
def test_peak_memory_sees_new_tensor():
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so every page is resident
    peak = memory.peak_mb()
    del block
    assert peak - memory.base_mb >= 60


def test_arms_share_samples_seen():
    plans = {plan.name: plan for plan in quality_ablation.plan_arms(quality_ablation.ARMS, 8, 8, 10, 2, 0.4)}
    assert {plan.samples_seen for plan in plans.values()} == {640}
    assert plans["clip-b"].steps == 80
    assert plans["clip-b"].warmup_steps == 16
    assert plans["clip-B"].micro_batch_size == 64


def test_arms_alpha_and_modes():
    plans = {plan.name: plan for plan in quality_ablation.plan_arms(quality_ablation.ARMS, 8, 8, 10, 2, 0.4)}
    for name in ("clip-b", "clip-B", "local", "momentum-alpha0"):
        assert plans[name].alpha == 0.0, name
    assert plans["clip-b"].accumulation_steps == 1
    assert plans["msd-momentum"].negatives == "momentum"
    assert plans["msd-momentum"].alpha == 0.4
    assert plans["msd-gradcache"].negatives == "gradcache"


def test_gap_closed_halfway():
    summary = pd.DataFrame({"arm": ["clip-b", "clip-B", "msd-momentum"], "zs_acc_mean": [0.2, 0.4, 0.3]})
    closed = quality_ablation.gap_closed(summary).set_index("arm")["closed"]
    assert closed["clip-b"] == pytest.approx(0.0)
    assert closed["clip-B"] == pytest.approx(1.0)
    assert closed["msd-momentum"] == pytest.approx(0.5)


def test_gap_closed_undefined_without_gap():
    summary = pd.DataFrame({"arm": ["clip-b", "clip-B", "msd-momentum"], "zs_acc_mean": [0.3, 0.3, 0.5]})
    closed = quality_ablation.gap_closed(summary)
    assert closed["closed"].isna().all()


def test_gap_closed_undefined_when_reversed():
    summary = pd.DataFrame({"arm": ["clip-b", "clip-B", "msd-momentum"], "zs_acc_mean": [0.4, 0.3, 0.2]})
    closed = quality_ablation.gap_closed(summary)
    assert closed["closed"].isna().all()
    assert closed["gap"].iloc[0] == pytest.approx(-0.1)


def test_quality_ablation_smoke_run(tmp_path):
    status = quality_ablation.main(["--quick", "--steps", "2", "--warmup", "1", "--pairs", "120", "--micro-batch", "4",
                                    "--accumulation", "2", "--arms", "clip-b,clip-B,msd-momentum", "--out",
                                    str(tmp_path)])
    runs = pd.read_csv(tmp_path / "quality_runs.csv")

    assert status == 0
    assert runs["arm"].tolist() == ["clip-b", "clip-B", "msd-momentum"]
    assert runs["samples_seen"].nunique() == 1
    assert runs["zero_shot_accuracy"].between(0, 1).all()
    assert runs["i2t_recall_at_5"].between(0, 1).all()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_per_sample_memory_fits_line():
    sweep = pd.DataFrame({"method": ["clip"] * 3, "B": [8, 16, 32], "step_mb": [18.0, 34.0, 66.0],
                          "out_of_memory": [False] * 3})
    slope, intercept = step_cost.per_sample_memory(sweep)
    assert slope == pytest.approx(2.0)
    assert intercept == pytest.approx(2.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
@pytest.mark.skipif(shutil.which("bash") is None, reason="gpu_check.sh is a bash script")
def test_gpu_check_needs_cuda(tmp_path):
    finished = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "gpu")],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode != 0
    assert "CUDA" in finished.stderr
    assert not (tmp_path / "gpu" / "step_cost").exists()


def test_t4_estimate_counts_static_memory():
    records = [{"parameters": 2**20, "trainable_parameters": 2**19, "missing_parameters": 0}]
    estimate = step_cost.t4_estimate(records, slope_mb=100.0, intercept_mb=0.0)
    static_mb = (2 * 2**20 + 3 * 2**19) * 4 / 2**20
    assert estimate["static_mb"].tolist() == [static_mb, static_mb]
    assert estimate["mb_per_pair"].tolist() == [50.0, 100.0]
    assert estimate["largest_micro_batch"].iloc[1] == int((step_cost.T4_ALLOCATABLE_MIB - static_mb) // 100)


def test_targets_flag_slow_momentum():
    timing = pd.DataFrame({"method": ["floor", "momentum"], "wall_x_floor": [1.0, 1.5], "cpu_x_floor": [1.0, 1.4]})
    targets = step_cost.check_targets(timing, None).set_index("target")["met"]
    assert not targets["momentum step time / floor (wall clock)"]
    assert targets["momentum step time / floor (CPU time)"]
