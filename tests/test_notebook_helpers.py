"""The notebook helpers: modes, run folders, the shared run, the environment report, step cost."""

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import msd_core.notebook as notebook
from msd_core.checkpoint import list_checkpoints
from msd_core.notebook import (ActivationMemory, finished_checkpoint, initial_model, load_history, notebook_config,
                               notebook_run, project_root, resolve_mode, settings_digest, setup, step_cost)
from msd_core.train import Trainer
from conftest import write_tiny_manifest


def smoke_run_settings(manifest: Path) -> dict:
    """Overrides that train the smoke preset for 2 steps on a tiny manifest instead of PhantomCXR."""
    return dict(manifest=str(manifest), num_workers=0, max_steps=2, checkpoint_every=100)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished smoke run (2 steps on 40 made-up pairs) in a project root of its own."""
    root = tmp_path_factory.mktemp("project")
    manifest = write_tiny_manifest(root / "data")
    return notebook_run("smoke", device="cpu", root=root, progress=False, **smoke_run_settings(manifest))


def stop_after_first_step(monkeypatch):
    """Make every training stop after its first step, as Ctrl-C would."""
    original = Trainer.train_step

    def train_step(self, micro_batches):
        record = original(self, micro_batches)
        if self.step == 1:
            self.stop_requested = True
        return record

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A project root whose smoke run stopped after step 1 of 2, and the error notebook_run raised."""
    root = tmp_path_factory.mktemp("interrupted")
    manifest = write_tiny_manifest(root / "data")
    with pytest.MonkeyPatch.context() as patch:
        stop_after_first_step(patch)
        with pytest.raises(RuntimeError) as error:
            notebook_run("smoke", device="cpu", root=root, progress=False, **smoke_run_settings(manifest))
    return root, manifest, error.value


# ------------------------------------------------------------------ modes


def test_mode_read_from_environment(monkeypatch):
    monkeypatch.setenv("MSD_MODE", "smoke")
    assert resolve_mode() == "smoke"


def test_mode_defaults_to_cpu_demo(monkeypatch):
    monkeypatch.delenv("MSD_MODE", raising=False)
    assert resolve_mode() == "cpu-demo"


def test_unknown_mode_names_choices():
    with pytest.raises(ValueError) as error:
        resolve_mode("gpu")
    assert "'gpu'" in str(error.value)
    assert "'full'" in str(error.value)


def test_full_mode_uses_colab_preset(tmp_path):
    config = notebook_config("full", root=tmp_path)
    assert config.preset == "colab-t4"


# -------------------------------------------------------------- run folders


def test_project_root_found_from_subfolder(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'msd-core'\n")
    (tmp_path / "msd_core").mkdir()
    (tmp_path / "notebooks").mkdir()
    assert project_root(tmp_path / "notebooks") == tmp_path.resolve()


def test_project_root_outside_checkout(tmp_path):
    assert project_root(tmp_path) == tmp_path.resolve()


def test_run_folder_under_mode(tmp_path):
    config = notebook_config("smoke", root=tmp_path)
    folder = Path(config.output_dir)
    assert folder.parent == tmp_path / "runs" / "notebooks" / "smoke"
    assert folder.name == f"run-{settings_digest(config)}"


def test_changed_setting_gets_new_folder(tmp_path):
    default = notebook_config("smoke", root=tmp_path)
    changed = notebook_config("smoke", root=tmp_path, alpha=0.0)
    assert changed.output_dir != default.output_dir


def test_bookkeeping_keeps_run_folder(tmp_path):
    default = notebook_config("smoke", root=tmp_path)
    changed = notebook_config("smoke", root=tmp_path, checkpoint_every=1, keep_checkpoints=9)
    assert changed.output_dir == default.output_dir


def test_explicit_output_dir_kept(tmp_path):
    config = notebook_config("smoke", root=tmp_path, output_dir=str(tmp_path / "mine"))
    assert config.output_dir == str(tmp_path / "mine")


# -------------------------------------------------------------- shared run


def test_run_trains_to_last_step(trained_run):
    assert trained_run.checkpoint.name == "step-000002.pt"
    assert trained_run.checkpoint.is_file()


def test_finished_run_is_reused(trained_run, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("notebook_run trained again although a finished run exists")

    monkeypatch.setattr(notebook, "train", fail)
    root = Path(trained_run.config.output_dir).parents[3]
    again = notebook_run("smoke", device="cpu", root=root, progress=False,
                         **smoke_run_settings(trained_run.manifest))
    assert again.checkpoint == trained_run.checkpoint


def test_finished_checkpoint_of_trained_run(trained_run):
    assert finished_checkpoint(trained_run.config) == trained_run.checkpoint


def test_finished_checkpoint_none_without_run(tmp_path):
    assert finished_checkpoint(notebook_config("smoke", root=tmp_path)) is None


def test_history_has_one_row_per_step(trained_run):
    history = load_history(trained_run.config)
    assert history["step"].tolist() == [1, 2]


def test_missing_history_names_file(tmp_path):
    config = notebook_config("smoke", root=tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        load_history(config)
    assert "history.csv" in str(error.value)


def test_run_manifest_is_configured_one(trained_run):
    assert trained_run.manifest == Path(trained_run.config.manifest)


def test_generated_manifest_inside_run_folder(tmp_path):
    config = notebook_config("smoke", root=tmp_path)
    assert notebook.run_manifest(config) == Path(config.output_dir) / "phantomcxr" / "manifest.csv"


def test_interrupted_training_raises(interrupted_run):
    _, _, error = interrupted_run
    assert "interrupted after step 1" in str(error)
    assert "resume" in str(error)


def test_unfinished_run_is_resumed(interrupted_run):
    root, manifest, _ = interrupted_run
    run = notebook_run("smoke", device="cpu", root=root, progress=False, **smoke_run_settings(manifest))
    assert run.checkpoint.name == "step-000002.pt"
    assert load_history(run.config)["step"].tolist() == [1, 2]


def test_run_with_other_settings_retrained(tiny_manifest, tmp_path):
    config = notebook_config("smoke", root=tmp_path, **smoke_run_settings(tiny_manifest))
    Trainer(config.replace(max_steps=3, alpha=0.0), progress=False).fit()  # other settings, same folder
    assert finished_checkpoint(config) is None

    run = notebook_run("smoke", device="cpu", root=tmp_path, progress=False, **smoke_run_settings(tiny_manifest))

    assert run.checkpoint.name == "step-000002.pt"
    assert list_checkpoints(Path(config.output_dir) / "checkpoints") == [run.checkpoint]
    assert finished_checkpoint(config) == run.checkpoint


# ---------------------------------------------------------- initial model


def test_initial_model_equals_training_start(tiny_manifest, tmp_path):
    config = notebook_config("smoke", root=tmp_path, **smoke_run_settings(tiny_manifest))
    start = initial_model(config)
    trainer = Trainer(config, progress=False)
    for (name, value), expected in zip(start.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(value, expected), name


def test_initial_model_keeps_caller_random_state(tiny_manifest, tmp_path):
    config = notebook_config("smoke", root=tmp_path, **smoke_run_settings(tiny_manifest))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    initial_model(config)

    assert torch.equal(torch.rand(3), expected)


def test_initial_model_in_eval_mode(tiny_manifest, tmp_path):
    config = notebook_config("smoke", root=tmp_path, **smoke_run_settings(tiny_manifest))
    assert not initial_model(config).training


# ------------------------------------------------------------- environment


@pytest.fixture
def project_loggers():
    """Restore the handlers, level and propagation of the project's loggers after a test."""
    loggers = [logging.getLogger(name) for name in ("msd_core", "data_prep")]
    saved = [(log.handlers[:], log.level, log.propagate) for log in loggers]
    yield loggers
    for log, (handlers, level, propagate) in zip(loggers, saved):
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


def test_setup_reports_mode_and_device(project_loggers):
    environment = setup("smoke", device="cpu", log_level=None)
    assert environment.mode == "smoke"
    assert environment.preset == "smoke"
    assert environment.device == "cpu"
    assert environment.accelerator_memory_gib is None
    assert environment.memory_total_gib > 0


def test_setup_description_names_mode(project_loggers):
    text = setup("smoke", device="cpu", log_level=None).describe()
    assert "smoke (preset smoke)" in text
    assert "RAM" in text


def test_setup_adds_one_log_handler(project_loggers):
    setup("smoke", device="cpu", log_level=logging.INFO)
    setup("smoke", device="cpu", log_level=logging.WARNING)
    for log in project_loggers:
        added = [h for h in log.handlers if getattr(h, "_msd_notebook", False)]
        assert len(added) == 1, log.name
        assert added[0].level == logging.WARNING, log.name


def test_setup_without_logging_leaves_loggers(project_loggers):
    before = [log.handlers[:] for log in project_loggers]
    setup("smoke", device="cpu", log_level=None)
    assert [log.handlers for log in project_loggers] == before


# ---------------------------------------------------------- activation memory


def three_layer_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))


def forward_backward_peak(model: nn.Module, rows: int, *exclude: nn.Module) -> int:
    with ActivationMemory(*exclude) as memory:
        model(torch.randn(rows, 8)).sum().backward()
    return memory.peak_bytes


def test_activation_memory_grows_with_batch():
    model = three_layer_model()
    small = forward_backward_peak(model, 8, model)
    large = forward_backward_peak(model, 32, model)
    assert small > 0
    assert large == 4 * small


def test_activation_memory_excludes_parameters():
    model = three_layer_model()
    assert forward_backward_peak(model, 8, model) < forward_backward_peak(model, 8)


def test_activation_memory_released_by_backward():
    model = three_layer_model()
    with ActivationMemory(model) as memory:
        loss = model(torch.randn(8, 8)).sum()
        bytes_after_forward = memory.current_bytes
        loss.backward()
    assert bytes_after_forward > 0
    assert memory.current_bytes == 0
    assert memory.peak_bytes == bytes_after_forward


def test_activation_memory_ignores_no_grad():
    model = three_layer_model()
    with ActivationMemory(model) as memory, torch.no_grad():
        model(torch.randn(8, 8))
    assert memory.peak_bytes == 0


# -------------------------------------------------------------- step cost


def test_accumulation_holds_one_micro_batch(tiny_manifest, tmp_path):
    config = notebook_config("smoke", root=tmp_path, **smoke_run_settings(tiny_manifest))
    accumulated = step_cost(config.replace(micro_batch_size=8, accumulation_steps=2), steps=1, warmup=0,
                            device="cpu")
    one_batch = step_cost(config.replace(micro_batch_size=16, accumulation_steps=1), steps=1, warmup=0,
                          device="cpu")
    assert accumulated["effective_batch_size"] == one_batch["effective_batch_size"] == 16
    assert accumulated["activation_peak_mb"] < 0.6 * one_batch["activation_peak_mb"]


@pytest.fixture(scope="module")
def measured_step(tmp_path_factory):
    """One measured smoke step on a tiny manifest: (config, step_cost result)."""
    root = tmp_path_factory.mktemp("cost")
    config = notebook_config("smoke", root=root, **smoke_run_settings(write_tiny_manifest(root / "data")))
    return config, step_cost(config, steps=1, warmup=0, device="cpu")


def test_step_cost_reports_time_and_mode(measured_step):
    _, cost = measured_step
    assert cost["step_time_s"] > 0
    assert cost["negatives"] == "momentum"


def test_step_cost_device_peak_nan_on_cpu(measured_step):
    _, cost = measured_step
    assert math.isnan(cost["device_peak_mb"])


def test_step_cost_writes_no_checkpoint(measured_step):
    config, _ = measured_step
    assert list_checkpoints(Path(config.output_dir) / "checkpoints") == []


def test_step_cost_rejects_zero_steps(tiny_manifest, tmp_path):
    config = notebook_config("smoke", root=tmp_path, **smoke_run_settings(tiny_manifest))
    with pytest.raises(ValueError, match="steps=0"):
        step_cost(config, steps=0)
