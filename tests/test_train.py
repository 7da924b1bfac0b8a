"""The training loop: accumulation equivalence, EMA schedule, queue, checkpoints, temperature."""

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from conftest import write_tiny_manifest
from msd_core.config import get_preset
from msd_core.momentum import MomentumTeacher
from msd_core.train import Trainer, load_model, train


def smoke_config(manifest, tmp_path, **changes):
    values = dict(manifest=str(manifest), output_dir=str(tmp_path / "run"), num_workers=0)
    values.update(changes)
    return get_preset("smoke", **values)


def test_accumulation_equals_large_batch(tiny_manifest, tmp_path):
    small = Trainer(smoke_config(tiny_manifest, tmp_path / "a", negatives="gradcache", micro_batch_size=4,
                                 accumulation_steps=2, max_steps=3), progress=False)
    large = Trainer(smoke_config(tiny_manifest, tmp_path / "b", negatives="gradcache", micro_batch_size=8,
                                 accumulation_steps=1, max_steps=3), progress=False)

    small.fit()
    large.fit()

    for (name, a), (_, b) in zip(small.model.named_parameters(), large.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name
    assert small.history[-1]["loss"] == pytest.approx(large.history[-1]["loss"], abs=1e-5)


def test_teacher_updates_once_per_step(tiny_manifest, tmp_path, monkeypatch):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, micro_batch_size=4, accumulation_steps=4, max_steps=2,
                                   momentum=0.9), progress=False)
    calls = []
    original = MomentumTeacher.update

    def counted_update(self):
        before = [p.clone() for p in self.model.parameters()]
        original(self)
        calls.append(before)

    monkeypatch.setattr(MomentumTeacher, "update", counted_update)
    batches = trainer._micro_batches()

    for step in range(2):
        trainer.train_step([next(batches) for _ in range(4)])
        assert len(calls) == step + 1
        for old, new, student in zip(calls[-1], trainer.teacher.model.parameters(), trainer.model.parameters()):
            assert torch.allclose(new, 0.9 * old + 0.1 * student, atol=1e-6)


def test_skipped_first_step_warns_nothing(tiny_manifest, tmp_path, monkeypatch):
    # Under fp16 the gradient scaler often skips the first optimizer step; the schedule still advances.
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, max_steps=2), progress=False)
    monkeypatch.setattr(trainer, "_optimizer_step", lambda: False)
    batches = trainer._micro_batches()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = trainer.train_step([next(batches) for _ in range(trainer.config.accumulation_steps)])

    assert record["optimizer_stepped"] is False
    assert trainer.scheduler.last_epoch == 1
    assert [str(w.message) for w in caught if "lr_scheduler" in str(w.message)] == []


def test_teacher_outside_optimizer(tiny_manifest, tmp_path):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path), progress=False)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}

    for parameter in trainer.teacher.model.parameters():
        assert not parameter.requires_grad
        assert id(parameter) not in optimized
    assert {id(p) for p in trainer.model.parameters()} == optimized


def test_queue_epoch_fills_every_slot(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", pairs=84)  # 70 train rows
    trainer = Trainer(smoke_config(manifest, tmp_path, micro_batch_size=32, accumulation_steps=1, queue_size=64,
                                   epochs=1, max_steps=None), progress=False)
    assert len(trainer.dataset) == 70
    assert trainer.steps_per_epoch == 2

    trainer.fit()

    ids = trainer.image_queue.ids
    assert 0 <= trainer.image_queue.pointer.item() < 64
    assert (ids >= 0).all()
    assert trainer.text_queue.ids.tolist() == ids.tolist()
    seen = [batch["study_index"] for batch in trainer._micro_batches_of_epoch(0)]
    assert sorted(ids.tolist()) == sorted(torch.cat(seen).tolist())


def test_resume_in_fresh_process(tiny_manifest, tmp_path):
    config = smoke_config(tiny_manifest, tmp_path, micro_batch_size=4, accumulation_steps=2, max_steps=4,
                          queue_size=16, alpha=0.4, checkpoint_every=100)
    trainer = Trainer(config, progress=False)
    batches = trainer._micro_batches()
    for _ in range(2):
        trainer.train_step([next(batches) for _ in range(2)])
    checkpoint = trainer.save()
    expected = {"teacher": {k: v.clone() for k, v in trainer.teacher.model.state_dict().items()},
                "queue": trainer.image_queue.features.clone(), "pointer": trainer.image_queue.pointer.item()}
    next_loss = trainer.train_step([next(batches) for _ in range(2)])["loss"]
    torch.save(expected, tmp_path / "expected.pt")

    script = textwrap.dedent(f"""
        import torch
        from msd_core.train import load_trainer
        trainer = load_trainer({str(checkpoint)!r}, progress=False)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for name, value in trainer.teacher.model.state_dict().items():
            assert torch.equal(value, expected["teacher"][name]), name
        assert torch.equal(trainer.image_queue.features, expected["queue"])
        assert trainer.image_queue.pointer.item() == expected["pointer"]
        batches = trainer._micro_batches()
        print(repr(trainer.train_step([next(batches) for _ in range(2)])["loss"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == next_loss


def test_temperature_starts_at_documented_value(tiny_manifest, tmp_path):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path), progress=False)

    assert trainer.model.scale().item() == pytest.approx(1 / 0.07)


def test_temperature_never_passes_cap(tiny_manifest, tmp_path):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, lr=1.0, warmup_steps=0, grad_clip=0.0),
                      progress=False)

    for _ in range(20):
        trainer.optimizer.zero_grad()
        trainer.model.logit_scale.grad = torch.tensor(-1.0)  # gradient descent pushes the scale up
        trainer._optimizer_step()
        assert trainer.model.logit_scale.item() <= math.log(100) + 1e-6
        assert trainer.model.scale().item() <= 100 + 1e-4
    assert trainer.model.scale().item() == pytest.approx(100, rel=1e-5)


def test_large_learning_rate_keeps_temperature_in_range(tiny_manifest, tmp_path):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, lr=0.5, warmup_steps=0, max_steps=30, grad_clip=0.0,
                                   micro_batch_size=4, accumulation_steps=1), progress=False)

    history = trainer.fit()

    taus = [record["tau"] for record in history.records]
    assert min(taus) >= 0.01 - 1e-7
    assert max(taus) <= 1.0 + 1e-6


def test_autocast_step_stays_finite(tiny_manifest, tmp_path):
    trainer = Trainer(smoke_config(tiny_manifest, tmp_path, precision="bf16", max_steps=1), progress=False)

    history = trainer.fit()

    assert math.isfinite(history[-1]["loss"])
    for name, parameter in trainer.model.named_parameters():
        assert torch.isfinite(parameter).all(), name


def test_train_writes_outputs(tiny_manifest, tmp_path):
    history = train(smoke_config(tiny_manifest, tmp_path, max_steps=3), progress=False)
    run = tmp_path / "run"

    assert len(history) == 3
    assert (run / "history.csv").read_text().startswith("step,epoch,loss")
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "checkpoints" / "step-000003.pt").is_file()
    assert (run / "checkpoints" / "step-000003.json").is_file()
    model = load_model(run)
    assert not model.training


def test_same_seed_same_losses(tiny_manifest, tmp_path):
    first = train(smoke_config(tiny_manifest, tmp_path / "a", max_steps=20, micro_batch_size=4,
                               accumulation_steps=1, checkpoint_every=100), progress=False)
    second = train(smoke_config(tiny_manifest, tmp_path / "b", max_steps=20, micro_batch_size=4,
                                accumulation_steps=1, checkpoint_every=100), progress=False)

    assert [r["loss"] for r in first.records] == [r["loss"] for r in second.records]
