"""Multi-process training: sharding, equivalence with one process, identical ranks, resume, rank-0 files.

Two gloo processes on 127.0.0.1 run the jobs of ``run_jobs`` once for this module;
the single-process references run in the test process itself. The equivalences use
the ``smoke`` preset's ViT and BERT, whose dropout is 0, so only floating-point
summation order separates the runs.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import write_tiny_manifest
from msd_core.config import get_preset
from msd_core.data import EpochBatchSampler
from msd_core.distributed import init_distributed
from msd_core.train import Trainer, load_trainer

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 240

# Global batch 16 pairs per step either way: 2 processes x (b=4, k=2) or 1 process x (b=8, k=2).
SHARED = dict(num_workers=0, max_steps=3, checkpoint_every=2, queue_size=16, alpha=0.4)
TWO_PROCESSES = dict(micro_batch_size=4, accumulation_steps=2)
ONE_PROCESS = dict(micro_batch_size=8, accumulation_steps=2)
# The same 4 micro-batches of 4 pairs, held by one process.
FOUR_MICRO_BATCHES = dict(micro_batch_size=4, accumulation_steps=4)
# Step 2 of momentum mode uses the teacher targets and the queue. Its image gradients on
# the smoke model change by about 1e-4 relative when the weights move by 1e-9 (measured).
# Adam's first step moves every weight by about lr whatever the gradient's size, so
# float32 noise at step 1 would show at step 2. A small lr keeps that noise near 2e-5.
MOMENTUM_STEPS = dict(max_steps=2, lr=1e-6)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_config(manifest, output_dir, negatives, geometry, **changes):
    values = dict(manifest=str(manifest), output_dir=str(output_dir), negatives=negatives, **SHARED, **geometry)
    values.update(changes)
    return get_preset("smoke", **values)


class GradientRecorder:
    """Stands in for a Trainer's gradient scaler and keeps the gradients each optimizer step receives.

    ``unscale_`` runs after the all-reduce and before clipping, so the recorded gradients
    are those of the global batch.
    """

    def __init__(self, scaler, model):
        self.scaler = scaler
        self.model = model
        self.steps = []

    def unscale_(self, optimizer):
        self.steps.append({name: p.grad.clone() for name, p in self.model.named_parameters() if p.grad is not None})
        return self.scaler.unscale_(optimizer)

    def __getattr__(self, name):
        return getattr(self.scaler, name)


class RankOrderTrainer(Trainer):
    """One process that puts its 4 micro-batches in the order 2 ranks of 2 micro-batches gather them.

    Global micro-batch j is split into rank 0's and rank 1's halves, and the ranks
    gather rank 0's rows first: micro-batches 0, 2, 1, 3 of one process. The momentum
    loss does not depend on the order of its keys, but its float32 gradients of some
    layer-norm biases do, by up to 1e-3 relative (measured on the smoke model), so the
    references keep the order.
    """

    def train_step(self, micro_batches):
        return super().train_step([micro_batches[i] for i in (0, 2, 1, 3)])


def skip_loss_curve(trainer):
    """Skip the loss-curve figure, which costs a second or two per run and is not compared here."""
    trainer._write_loss_curve = lambda: None
    return trainer


def recording_trainer(config, trainer_class=Trainer, plot=False):
    trainer = trainer_class(config, progress=False)
    trainer.scaler = GradientRecorder(trainer.scaler, trainer.model)
    return trainer if plot else skip_loss_curve(trainer)


def queue_state(queue):
    return None if queue is None else {k: v.clone() for k, v in queue.state_dict().items()}


def snapshot(trainer):
    """The state every rank must agree on, as CPU tensors."""
    return {
        "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in trainer.teacher.model.state_dict().items()},
        "image_queue": queue_state(trainer.image_queue),
        "text_queue": queue_state(trainer.text_queue),
        "losses": [record["loss"] for record in trainer.history.records],
        "gradients": trainer.scaler.steps if isinstance(trainer.scaler, GradientRecorder) else [],
    }


# ----------------------------------------------------------------- worker side


def record_writes(folder: Path, events: list) -> None:
    """Record every file this process creates, opens for writing, renames or deletes under ``folder``."""
    prefix = str(folder)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = str(os.fsdecode(args[0])), args[1], args[2] or 0
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags & write_flags)
            if writing and path.startswith(prefix):
                events.append(("open", path))
        elif event == "os.rename" and str(args[1]).startswith(prefix):
            events.append((event, str(args[1])))  # the destination: checkpoints are renamed into place
        elif event in ("os.remove", "os.mkdir") and str(args[0]).startswith(prefix):
            events.append((event, str(args[0])))

    sys.addaudithook(hook)


class RecordList(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))


def run_jobs(rank: int, world_size: int, jobs: list[dict], out: str) -> None:
    """Run each job as one rank of a gloo group on 127.0.0.1 and save what it produced."""
    torch.set_num_threads(1)
    out = Path(out)
    writes: list = []
    record_writes(out / "gradcache-run", writes)
    logs = RecordList()
    msd_logger = logging.getLogger("msd_core")
    msd_logger.addHandler(logs)
    msd_logger.setLevel(logging.INFO)

    for job in jobs:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        if "resume_from" in job:
            trainer = skip_loss_curve(load_trainer(job["resume_from"], progress=False, **job["changes"]))
        else:
            trainer = recording_trainer(job["config"], plot=job["name"] == "gradcache")
        trainer.fit()
        result = snapshot(trainer)
        if job["name"] == "gradcache":
            result["writes"] = list(writes)
            result["logs"] = list(logs.records)
        torch.save(result, out / f"{job['name']}-rank{rank}.pt")


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references, then the two-process jobs, then a resume on one process."""
    root = tmp_path_factory.mktemp("distributed")
    manifest = write_tiny_manifest(root / "data")
    results = {}

    # References on one process with the same global batch. The gradcache reference's
    # step-2 checkpoint is resumed on two processes below.
    reference = recording_trainer(make_config(manifest, root / "reference", "gradcache", ONE_PROCESS))
    reference.fit()
    results["gradcache-reference"] = snapshot(reference)
    momentum = recording_trainer(make_config(manifest, root / "momentum-reference", "momentum", FOUR_MICRO_BATCHES,
                                             **MOMENTUM_STEPS), RankOrderTrainer)
    momentum.fit()
    results["momentum-reference"] = snapshot(momentum)
    # local mode: k micro-batches on each of 2 ranks are the 2k micro-batches one process trains on.
    local = recording_trainer(make_config(manifest, root / "local-reference", "local", FOUR_MICRO_BATCHES,
                                          queue_size=0, max_steps=1), RankOrderTrainer)
    local.fit()
    results["local-reference"] = snapshot(local)

    jobs = [
        dict(name="gradcache", port=free_port(),
             config=make_config(manifest, root / "gradcache-run", "gradcache", TWO_PROCESSES)),
        dict(name="momentum", port=free_port(),
             config=make_config(manifest, root / "momentum-run", "momentum", TWO_PROCESSES, **MOMENTUM_STEPS)),
        dict(name="local", port=free_port(),
             config=make_config(manifest, root / "local-run", "local", TWO_PROCESSES, queue_size=0, max_steps=1)),
        dict(name="resumed-on-two", port=free_port(), resume_from=str(root / "reference/checkpoints/step-000002.pt"),
             changes=dict(micro_batch_size=4, output_dir=str(root / "resumed-on-two"))),
    ]
    context = mp.start_processes(run_jobs, args=(WORLD_SIZE, jobs, str(root)), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two-process jobs did not finish within {SPAWN_TIMEOUT_S} s")
    for job in jobs:
        for rank in range(WORLD_SIZE):
            results[f"{job['name']}-rank{rank}"] = torch.load(root / f"{job['name']}-rank{rank}.pt",
                                                              weights_only=False)

    resumed = skip_loss_curve(load_trainer(root / "gradcache-run/checkpoints/step-000002.pt", progress=False,
                                           micro_batch_size=8, output_dir=str(root / "resumed-on-one")))
    resumed.fit()
    results["resumed-on-one"] = snapshot(resumed)
    results["root"] = root
    return results


def max_difference(first: dict, second: dict) -> tuple[float, str]:
    return max(((first[name].double() - second[name].double()).abs().max().item(), name) for name in second)


def assert_same_gradients(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        error = (actual[name].double() - expected[name].double()).norm().item()
        size = expected[name].double().norm().item()
        assert error <= 1e-4 * size + 1e-9, f"{name}: |difference| {error:.3g}, |gradient| {size:.3g}"


# ------------------------------------------------------------------- sampler


def test_shards_never_share_rows():
    shards = [list(EpochBatchSampler(50, 4, seed=1, rank=rank, world_size=3)) for rank in range(3)]
    rows = [row for shard in shards for batch in shard for row in batch]

    assert len(rows) == len(set(rows))
    assert len(rows) == (50 // 12) * 12
    assert {len(shard) for shard in shards} == {50 // 12}


def test_shards_form_single_process_batch():
    single = list(EpochBatchSampler(50, 12, seed=1, epoch=2))
    shards = [list(EpochBatchSampler(50, 4, seed=1, epoch=2, rank=rank, world_size=3)) for rank in range(3)]

    for step, expected in enumerate(single):
        assert shards[0][step] + shards[1][step] + shards[2][step] == expected


def test_shards_reshuffle_each_epoch():
    first = list(EpochBatchSampler(40, 4, seed=0, epoch=0, rank=1, world_size=2))
    again = list(EpochBatchSampler(40, 4, seed=0, epoch=0, rank=1, world_size=2))
    second = list(EpochBatchSampler(40, 4, seed=0, epoch=1, rank=1, world_size=2))

    assert first == again
    assert first != second


def test_shard_resumes_mid_epoch():
    whole = list(EpochBatchSampler(40, 4, seed=0, rank=1, world_size=2))
    tail = list(EpochBatchSampler(40, 4, seed=0, start_batch=3, rank=1, world_size=2))

    assert tail == whole[3:]


def test_sampler_rejects_rank_outside_world():
    with pytest.raises(ValueError, match="invalid rank=2 with world_size=2"):
        EpochBatchSampler(40, 4, seed=0, rank=2, world_size=2)


def test_world_size_without_rank_rejected(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)

    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 is set but RANK is missing; start multi-process runs with "
                                           "torchrun"):
        init_distributed("cpu")


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    context, device = init_distributed("cpu")

    assert not context.enabled
    assert device == torch.device("cpu")
    assert not torch.distributed.is_initialized()


def test_resume_rejects_model_changes(tmp_path):
    with pytest.raises(ValueError, match=r"invalid change of \['embed_dim'\] on resume"):
        load_trainer(tmp_path, embed_dim=16)


# ------------------------------------------------------- two gloo processes


@pytest.mark.slow
def test_two_processes_match_one(runs):
    difference, name = max_difference(runs["gradcache-rank0"]["model"], runs["gradcache-reference"]["model"])

    assert difference <= 1e-5, name
    assert runs["gradcache-rank0"]["losses"] == pytest.approx(runs["gradcache-reference"]["losses"], abs=1e-5)


@pytest.mark.slow
def test_gradcache_gradients_match_one_process(runs):
    for step in range(3):
        assert_same_gradients(runs["gradcache-rank0"]["gradients"][step],
                              runs["gradcache-reference"]["gradients"][step])


@pytest.mark.slow
def test_momentum_gradients_match_one_process(runs):
    # Step 2 uses the teacher targets (alpha > 0) and the queue filled at step 1.
    for step in range(2):
        assert_same_gradients(runs["momentum-rank0"]["gradients"][step],
                              runs["momentum-reference"]["gradients"][step])


@pytest.mark.slow
def test_local_matches_more_micro_batches(runs):
    assert_same_gradients(runs["local-rank0"]["gradients"][0], runs["local-reference"]["gradients"][0])


@pytest.mark.slow
def test_ranks_hold_identical_teachers(runs):
    for job in ("gradcache", "momentum"):
        first, second = runs[f"{job}-rank0"], runs[f"{job}-rank1"]
        for name, value in first["teacher"].items():
            assert torch.equal(value, second["teacher"][name]), f"{job}: {name}"
        for name, value in first["model"].items():
            assert torch.equal(value, second["model"][name]), f"{job}: {name}"


@pytest.mark.slow
def test_ranks_hold_identical_queues(runs):
    for job in ("gradcache", "momentum"):
        for queue in ("image_queue", "text_queue"):
            first, second = runs[f"{job}-rank0"][queue], runs[f"{job}-rank1"][queue]
            assert (first["ids"] >= 0).all(), f"{job} {queue} not filled by the gathered global batch"
            for name in ("features", "ids", "pointer"):
                assert torch.equal(first[name], second[name]), f"{job} {queue}.{name}"


@pytest.mark.slow
def test_queue_holds_global_batch(runs):
    # One process with the same global batch enqueues the same rows, in another order.
    distributed = runs["gradcache-rank0"]["image_queue"]
    single = runs["gradcache-reference"]["image_queue"]

    assert sorted(distributed["ids"].tolist()) == sorted(single["ids"].tolist())
    assert distributed["pointer"].item() == single["pointer"].item()


@pytest.mark.slow
def test_only_rank_zero_writes(runs):
    rank0, rank1 = runs["gradcache-rank0"]["writes"], runs["gradcache-rank1"]["writes"]
    written = {Path(path).name for _, path in rank0}

    assert rank1 == []
    assert {"history.csv", "config.yaml", "loss_curve.png", "step-000003.pt"} <= written


@pytest.mark.slow
def test_other_ranks_log_warnings_only(runs):
    rank0 = [message for _, message in runs["gradcache-rank0"]["logs"]]

    assert any("x 2 processes = effective batch 16" in message for message in rank0)
    assert all(level >= logging.WARNING for level, _ in runs["gradcache-rank1"]["logs"])


@pytest.mark.slow
def test_checkpoint_keeps_each_rank_generators(runs):
    state = torch.load(runs["root"] / "gradcache-run/checkpoints/step-000003.pt", weights_only=False)

    assert state["world_size"] == 2
    assert state["global_batch_size"] == 16
    assert len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])


@pytest.mark.slow
def test_resume_on_one_process(runs):
    difference, name = max_difference(runs["resumed-on-one"]["model"], runs["gradcache-reference"]["model"])

    assert difference <= 1e-5, name


@pytest.mark.slow
def test_resume_on_two_processes(runs):
    difference, name = max_difference(runs["resumed-on-two-rank0"]["model"], runs["gradcache-reference"]["model"])

    assert difference <= 1e-5, name
    assert runs["resumed-on-two-rank1"]["losses"] == runs["resumed-on-two-rank0"]["losses"]


# ----------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_command_trains(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "msd_core", "pretrain", "--preset", "smoke", "--manifest", str(manifest), "--output-dir", str(run),
               "--max-steps", "2", "--set", "micro_batch_size=4", "--set", "num_workers=0", "--no-evaluate",
               "--no-progress"]
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    environment["OMP_NUM_THREADS"] = "1"

    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("x 2 processes = effective batch 16") == 1
    assert (run / "checkpoints" / "step-000002.pt").is_file()
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3
