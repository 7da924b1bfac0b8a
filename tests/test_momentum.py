"""The EMA teacher and the feature queue."""

import pytest
import torch
from torch import nn

from msd_core.momentum import FeatureQueue, MomentumTeacher


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(self.linear(x))


def perturb(student, generator):
    """Change the student's weights and batch-norm statistics as a training step would."""
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    student.train()
    student(torch.randn(8, 4, generator=generator))


def test_teacher_update_matches_closed_form():
    torch.manual_seed(0)
    student = TinyNet()
    teacher = MomentumTeacher(student, momentum=0.9)
    before = [p.clone() for p in teacher.model.parameters()]
    perturb(student, torch.Generator().manual_seed(1))

    teacher.update()

    for old, new, current in zip(before, teacher.model.parameters(), student.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * current, atol=1e-7)


def test_teacher_needs_no_gradients():
    teacher = MomentumTeacher(TinyNet(), momentum=0.99)

    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training


def test_copy_policy_buffers_after_ten_updates():
    torch.manual_seed(0)
    student = TinyNet()
    teacher = MomentumTeacher(student, momentum=0.9, buffer_policy="copy")
    generator = torch.Generator().manual_seed(2)

    for _ in range(10):
        perturb(student, generator)
        teacher.update()

    for name, buffer in teacher.model.named_buffers():
        assert torch.equal(buffer, dict(student.named_buffers())[name]), name


def test_ema_policy_buffers_after_ten_updates():
    torch.manual_seed(0)
    student = TinyNet()
    teacher = MomentumTeacher(student, momentum=0.9, buffer_policy="ema")
    generator = torch.Generator().manual_seed(2)
    expected_mean = student.norm.running_mean.clone()

    for _ in range(10):
        perturb(student, generator)
        teacher.update()
        expected_mean = 0.9 * expected_mean + 0.1 * student.norm.running_mean

    assert torch.allclose(teacher.model.norm.running_mean, expected_mean, atol=1e-6)
    assert not torch.allclose(teacher.model.norm.running_mean, student.norm.running_mean)
    assert teacher.model.norm.num_batches_tracked.item() == student.norm.num_batches_tracked.item()


def test_invalid_momentum_rejected():
    with pytest.raises(ValueError, match="momentum"):
        MomentumTeacher(TinyNet(), momentum=1.0)


def test_queue_wraps_and_keeps_newest():
    queue = FeatureQueue(size=5, dim=2)
    features = torch.arange(14, dtype=torch.float32).view(7, 2)

    queue.enqueue(features[:3], torch.arange(3))
    queue.enqueue(features[3:], torch.arange(3, 7))

    stored, ids = queue.valid()
    assert sorted(ids.tolist()) == [2, 3, 4, 5, 6]
    assert queue.pointer.item() == 2
    for row, sample in zip(stored, ids):
        assert torch.equal(row, features[sample])


def test_queue_empty_slots_left_out():
    queue = FeatureQueue(size=8, dim=2)

    queue.enqueue(torch.ones(3, 2), torch.tensor([4, 5, 6]))

    stored, ids = queue.valid()
    assert stored.shape == (3, 2)
    assert ids.tolist() == [4, 5, 6]


def test_queue_longer_batch_than_size():
    queue = FeatureQueue(size=4, dim=1)

    queue.enqueue(torch.arange(10, dtype=torch.float32).view(10, 1), torch.arange(10))

    _, ids = queue.valid()
    assert sorted(ids.tolist()) == [6, 7, 8, 9]
    assert 0 <= queue.pointer.item() < 4
