"""Faults: kill and resume, Ctrl-C, non-finite loss, out of memory, invalid configs, provenance."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from msd_core import train as train_module
from msd_core.checkpoint import find_checkpoint, list_checkpoints
from msd_core.config import TrainConfig, get_preset
from msd_core.train import NonFiniteLossError, Trainer, TrainingOutOfMemoryError, load_model


def smoke_config(manifest, folder, **changes):
    values = dict(manifest=str(manifest), output_dir=str(folder), num_workers=0, micro_batch_size=4,
                  accumulation_steps=2)
    values.update(changes)
    return get_preset("smoke", **values)


def pretrain_command(manifest, folder, steps, *extra):
    return [sys.executable, "-m", "msd_core", "pretrain", "--preset", "smoke", "--manifest", str(manifest),
            "--output-dir", str(folder), "--max-steps", str(steps), "--set", "checkpoint_every=1",
            "--set", "micro_batch_size=4", "--set", "accumulation_steps=1", "--no-evaluate", "--no-progress", *extra]


def wait_for_checkpoint(folder, process, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list_checkpoints(folder / "checkpoints"):
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early with {process.returncode}: {process.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_then_resume_matches(tiny_manifest, tmp_path):
    steps = 60
    reference = subprocess.run(pretrain_command(tiny_manifest, tmp_path / "reference", steps), capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen(pretrain_command(tiny_manifest, killed, steps), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(killed, process)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    stopped_at = int(list_checkpoints(killed / "checkpoints")[0].stem.split("-")[1])

    resumed = subprocess.run(pretrain_command(tiny_manifest, killed, steps, "--resume"), capture_output=True,
                             text=True, timeout=300)

    assert resumed.returncode == 0, resumed.stderr
    assert stopped_at < steps, "the kill came after the run had finished; the test proved nothing"
    expected = load_model(tmp_path / "reference").state_dict()
    actual = load_model(killed).state_dict()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_partial_checkpoint_falls_back(tiny_manifest, tmp_path, caplog):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=4, checkpoint_every=1), progress=False)
    trainer.fit()
    newest, previous = list_checkpoints(tmp_path / "checkpoints")[:2]
    newest.write_bytes(newest.read_bytes()[:1000])  # as if the machine died mid-write without the rename

    path, state = find_checkpoint(tmp_path)

    assert path == previous
    assert state["step"] == 3
    assert newest.name in caplog.text
    assert previous.name in caplog.text


def test_old_checkpoints_rotated(tiny_manifest, tmp_path):
    Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=5, checkpoint_every=1, keep_checkpoints=2),
            progress=False).fit()

    names = [path.name for path in list_checkpoints(tmp_path / "checkpoints")]

    assert names == ["step-000005.pt", "step-000004.pt"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_ctrl_c_saves_and_returns(tiny_manifest, tmp_path, monkeypatch):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=10, checkpoint_every=100), progress=False)
    original = Trainer.train_step

    def interrupt_at_third(self, batches):
        record = original(self, batches)
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)
        return record

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_third)

    history = trainer.fit()

    assert history.interrupted
    assert len(history) == 3
    assert history.checkpoint.name == "step-000003.pt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_subprocess_exits_cleanly(tiny_manifest, tmp_path):
    process = subprocess.Popen(pretrain_command(tiny_manifest, tmp_path, 100000), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(tmp_path, process)

    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "interrupted: continue with" in stdout
    assert "Traceback" not in stderr
    path, state = find_checkpoint(tmp_path)
    assert state["step"] == len(state["history"])


def test_nan_loss_stops_with_details(tiny_manifest, tmp_path):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=10, checkpoint_every=2), progress=False)
    original = Trainer.train_step

    def poison_after_two(self, batches):
        if self.step == 2:
            with torch.no_grad():
                self.model.image_projection.weight.fill_(float("nan"))
        return original(self, batches)

    trainer.train_step = poison_after_two.__get__(trainer)

    with pytest.raises(NonFiniteLossError) as raised:
        trainer.fit()

    message = str(raised.value)
    assert "non-finite loss at step 3" in message
    assert "image-to-text nan" in message
    assert "tau=" in message
    assert "lr=" in message
    assert "step-000002.pt" in message


def test_fp16_skips_up_to_limit(tiny_manifest, tmp_path, monkeypatch):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=10, max_skipped_steps=2), progress=False)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)  # replaces CUDA's fp16 loss scaling, which the CPU lacks
    original = train_module.accumulate_gradients

    def nan_loss(*args, **kwargs):
        output = original(*args, **kwargs)
        output.loss = float("nan")
        return output

    monkeypatch.setattr(train_module, "accumulate_gradients", nan_loss)
    batches = trainer._micro_batches()

    for _ in range(2):
        record = trainer.train_step([next(batches) for _ in range(2)])
        assert not record["optimizer_stepped"]
    with pytest.raises(NonFiniteLossError, match="3 steps skipped .* max_skipped_steps=2"):
        trainer.train_step([next(batches) for _ in range(2)])


def test_out_of_memory_suggests_micro_batch(tiny_manifest, tmp_path, monkeypatch):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, micro_batch_size=8, accumulation_steps=2),
                      progress=False)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    original_forward = type(trainer.model).forward

    def forward_up_to_two(self, pixel_values, input_ids, attention_mask):
        if pixel_values.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original_forward(self, pixel_values, input_ids, attention_mask)

    monkeypatch.setattr(train_module, "accumulate_gradients", out_of_memory)
    monkeypatch.setattr(type(trainer.model), "forward", forward_up_to_two)
    batches = trainer._micro_batches()

    with pytest.raises(TrainingOutOfMemoryError) as raised:
        trainer.train_step([next(batches) for _ in range(2)])

    message = str(raised.value)
    assert "micro_batch_size=8" in message
    assert "try micro_batch_size=2 with accumulation_steps=8" in message


@pytest.mark.parametrize("field, value, expected", [
    ("micro_batch_size", 0, "invalid micro_batch_size=0: must be a positive integer"),
    ("accumulation_steps", -1, "invalid accumulation_steps=-1: must be a positive integer"),
    ("embed_dim", 0, "invalid embed_dim=0"),
    ("alpha", 1.5, r"invalid alpha=1.5: must be in \[0, 1\]"),
    ("alpha", -0.1, r"invalid alpha=-0.1"),
    ("momentum", 1.0, r"invalid momentum=1.0: must be in \[0, 1\)"),
    ("queue_size", -4, "invalid queue_size=-4: must be an integer >= 0"),
    ("negatives", "moco", "invalid negatives='moco': must be one of"),
    ("precision", "fp8", "invalid precision='fp8'"),
    ("lr", 0.0, "invalid lr=0.0"),
])
def test_invalid_config_field_rejected(field, value, expected):
    with pytest.raises(ValueError, match=expected):
        TrainConfig(**{field: value})


def test_unknown_preset_rejected():
    with pytest.raises(ValueError, match="unknown preset 'huge'; available presets"):
        get_preset("huge")


def test_unknown_config_field_rejected():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_config_yaml_round_trip(tmp_path):
    config = get_preset("cpu-demo", lr=3e-4, queue_size=128)

    config.to_yaml(tmp_path / "config.yaml")

    assert TrainConfig.from_yaml(tmp_path / "config.yaml") == config


def test_skipping_run_reports_drops(tiny_manifest, tmp_path):
    (tiny_manifest.parent / "images" / "pair0001.png").unlink()
    (tiny_manifest.parent / "images" / "pair0002.png").write_text("not an image")
    command = pretrain_command(tiny_manifest, tmp_path / "run", 6, "--skip-bad-rows")

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "rows dropped: {'image not found': 1}" in result.stdout
    assert "unreadable images skipped:" in result.stdout


def test_bad_manifest_cli_error_is_short(tiny_manifest, tmp_path):
    (tiny_manifest.parent / "images" / "pair0001.png").unlink()

    result = subprocess.run(pretrain_command(tiny_manifest, tmp_path / "run", 2), capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 2
    assert "error: row 1 of" in result.stderr
    assert "--skip-bad-rows" in result.stderr
    assert "Traceback" not in result.stderr


def test_info_prints_provenance(tiny_manifest, tmp_path):
    Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=2), progress=False).fit()

    result = subprocess.run([sys.executable, "-m", "msd_core", "info", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "step: 2" in result.stdout
    assert "git commit:" in result.stdout
    assert "torch:" in result.stdout
    assert "negatives: momentum" in result.stdout
    sidecar = (tmp_path / "checkpoints" / "step-000002.json").read_text()
    assert '"transformers"' in sidecar
