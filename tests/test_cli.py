"""Command-line values and run folders: exponent numbers, hand-written configs, earlier runs."""

import logging
import subprocess
import sys

import pytest

from msd_core.checkpoint import CheckpointError, find_checkpoint
from msd_core.cli import parse_overrides
from msd_core.config import TrainConfig, get_preset
from msd_core.train import Trainer, load_trainer


def smoke_config(manifest, folder, **changes):
    return get_preset("smoke", manifest=str(manifest), output_dir=str(folder), num_workers=0, **changes)


def test_set_reads_exponent_as_float():
    overrides = parse_overrides(["lr=3e-4", "momentum=1E-2", "negatives=gradcache", "max_steps=10"])

    assert overrides == {"lr": 3e-4, "momentum": 0.01, "negatives": "gradcache", "max_steps": 10}


def test_set_keeps_word_with_digits_text():
    assert parse_overrides(["output_dir=run_1e3"]) == {"output_dir": "run_1e3"}


def test_hand_written_yaml_exponent_lr(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-2\n", encoding="utf-8")

    config = TrainConfig.from_yaml(path)

    assert config.lr == 1e-3
    assert config.weight_decay == 0.05


def test_new_run_rejects_earlier_checkpoints(tiny_manifest, tmp_path):
    Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=2), progress=False).fit()

    with pytest.raises(FileExistsError, match=r"earlier run \(newest: step-000002.pt\).*--resume"):
        Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=1), progress=False)


def test_cli_earlier_run_error_is_short(tiny_manifest, tmp_path):
    command = [sys.executable, "-m", "msd_core", "pretrain", "--preset", "smoke", "--manifest", str(tiny_manifest),
               "--output-dir", str(tmp_path), "--max-steps", "1", "--no-evaluate", "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr

    second = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert second.returncode == 2
    assert "already contains checkpoints of an earlier run" in second.stderr
    assert "Traceback" not in second.stderr


def test_missing_checkpoint_file_named(tmp_path):
    (tmp_path / "checkpoints").mkdir()

    with pytest.raises(CheckpointError, match="checkpoint file not found: .*step-000030.pt"):
        find_checkpoint(tmp_path / "checkpoints" / "step-000030.pt")


def test_help_shows_single_backticks():
    result = subprocess.run([sys.executable, "-m", "data_prep", "iu_xray", "--help"], capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 0, result.stderr
    assert "``" not in result.stdout


def test_closed_output_pipe_no_traceback(tiny_manifest, tmp_path):
    Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=1), progress=False).fit()
    process = subprocess.Popen([sys.executable, "-m", "msd_core", "info", str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, bufsize=0)

    process.stdout.close()  # as `| head` does once it has read enough
    _, stderr = process.communicate(timeout=60)

    assert "Traceback" not in stderr.decode()
    assert "BrokenPipeError" not in stderr.decode()


def test_load_logs_step_of_epoch_run(tiny_manifest, tmp_path, caplog):
    # Runs sized by epochs have max_steps None, so the message gives the steps the epochs make.
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=None, epochs=1), progress=False)
    trainer.fit()

    with caplog.at_level(logging.INFO, logger="msd_core.train"):
        load_trainer(tmp_path, progress=False)

    assert f"step {trainer.total_steps} of {trainer.total_steps}" in caplog.text
