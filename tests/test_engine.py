"""The training step and its cadence: label smoothing and gradient clipping do what they say, precision
`auto` follows the hardware, the checkpointer saves exactly when its rules say, and the generator
that train.py and the benchmark drive takes the steps and logs the lr each step used."""

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from distcifar.checkpoint import Checkpointer
from distcifar.config import CheckpointConfig, Config, OptimConfig
from distcifar.engine import Parts, RunState, StepReport, evaluate, train_step
from distcifar.runtime import build_accelerator


@pytest.fixture
def accelerator(fresh_accelerate_state):
    return Accelerator(cpu=True, mixed_precision="no")


def _linear_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(6, 4)
    images, labels = torch.randn(8, 6, generator=generator), torch.randint(0, 4, (8,), generator=generator)
    return model, images, labels


def test_train_step_loss_is_label_smoothed_cross_entropy(accelerator):
    model, images, labels = _linear_problem()
    with torch.no_grad():
        log_p = model(images).log_softmax(1)
    eps = 0.2
    # (1 - eps) * NLL of the true class + eps * mean over classes of -log p, written out by hand
    expected = ((1 - eps) * -log_p[torch.arange(8), labels] + eps * -log_p.mean(1)).mean()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = train_step(accelerator, model, optimizer, [(images, labels)], OptimConfig(label_smoothing=eps), False)
    torch.testing.assert_close(loss, expected)


def test_grad_clip_bounds_the_update_and_reports_the_norm_before_clipping(accelerator):
    model, images, labels = _linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(images), labels).backward()
    raw_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    model.zero_grad()
    clip = raw_norm / 4
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD, lr 1: the update is minus the gradient
    _, grad_norm = train_step(accelerator, model, optimizer, [(images, labels)],
                              OptimConfig(label_smoothing=0.0, grad_clip=clip), False)
    update = math.sqrt(sum(float((b - p.detach()).pow(2).sum()) for b, p in zip(before, model.parameters())))
    assert float(grad_norm) == pytest.approx(raw_norm, rel=1e-5)
    assert update == pytest.approx(clip, rel=1e-4)


def test_grad_accumulation_averages_micro_batches(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, images, labels = _linear_problem()
    reference = torch.nn.Linear(6, 4)
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(images), labels).backward()  # the whole batch at once
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))  # as engine.build does
    micro = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    before = [p.detach().clone() for p in model.parameters()]
    train_step(accelerator, model, optimizer, micro, OptimConfig(label_smoothing=0.0), False)
    for b, p, r in zip(before, model.parameters(), reference.parameters()):
        torch.testing.assert_close(b - p.detach(), r.grad)


@pytest.mark.parametrize("asked", ["auto", "no", "bf16"])
def test_mixed_precision_auto_follows_the_cpu(tmp_path, fresh_accelerate_state, asked):
    cfg = Config(output_dir=str(tmp_path))
    cfg.train.mixed_precision = asked
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX-512-BF16 / AMX; emulated elsewhere
    expected = {"auto": "bf16" if native_bf16 else "no"}.get(asked, asked)
    assert build_accelerator(cfg).mixed_precision == expected


@pytest.mark.parametrize("every_steps, expected", [(0, [8, 16]), (5, [5, 8, 10, 15, 16]), (4, [4, 8, 12, 16])])
def test_checkpointer_saves_at_epoch_ends_the_end_and_every_n_steps(accelerator, every_steps, expected):
    checkpoints = Checkpointer(accelerator, "unused", CheckpointConfig(every_steps=every_steps), {})
    due = [step for step in range(1, 17)
           if checkpoints.due(RunState(step=step), StepReport(), epoch_end=step % 8 == 0, last=step == 16)]
    assert due == expected


def test_checkpointer_saves_on_a_signal_or_the_timer_but_not_twice_at_one_step(accelerator, monkeypatch):
    checkpoints = Checkpointer(accelerator, "unused", CheckpointConfig(every_minutes=1.0), {})
    state = RunState(step=3)
    assert not checkpoints.due(state, StepReport(), epoch_end=False, last=False)
    assert checkpoints.due(state, StepReport(stop_signal=15), epoch_end=False, last=False)
    assert checkpoints.due(state, StepReport(timer_due=True), epoch_end=False, last=False)
    assert not checkpoints.timer_expired()
    monkeypatch.setattr(checkpoints, "saved_at", checkpoints.saved_at - 61)
    assert checkpoints.timer_expired()
    checkpoints.saved_step = 3  # already saved at this step (e.g. the resume point)
    assert not checkpoints.due(state, StepReport(stop_signal=15), epoch_end=True, last=True)


def test_evaluate_counts_true_rows_and_predicted_columns_and_the_mean_loss(accelerator):
    class Fixed(torch.nn.Module):  # always the same logits: class 2 most likely, then class 0
        def forward(self, images):
            return torch.tensor([[1.0, 0.0, 3.0]]).expand(len(images), 3)

    labels = torch.tensor([0, 2, 2, 1, 2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(5, 3, 32, 32, dtype=torch.uint8),
                                                                        labels), batch_size=2)
    result = evaluate(accelerator, Parts(Fixed(), loader, torch.contiguous_format), num_classes=3)
    assert result["confusion"] == [[0, 0, 1], [0, 0, 1], [0, 0, 3]]  # rows: true class, columns: predicted
    assert result["per_class_accuracy"] == [0.0, 0.0, 1.0]
    assert result["eval_accuracy"] == 3 / 5 and result["eval_samples"] == 5
    log_p = torch.tensor([1.0, 0.0, 3.0]).log_softmax(0)
    assert result["eval_loss"] == pytest.approx(-(log_p[0] + log_p[1] + 3 * log_p[2]).item() / 5)
