"""The training step and its cadence: label smoothing and gradient clipping do what they say, precision
`auto` follows the hardware, the checkpointer saves exactly when its rules say, the step generator that
train.py and the benchmark drive reads nothing back from the device between logging steps and counts only
its own time as training time, and evaluation never runs the torch.compile'd model."""

import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from distcifar import tracking
from distcifar.accelerator import build_accelerator
from distcifar.cadence import Cadence
from distcifar.checkpoint import Checkpointer
from distcifar.config import Config, OptimConfig
from distcifar.data import Split, normalize
from distcifar.engine import Progress, build_training, evaluate, optimizer_steps, train_step
from distcifar.hardware import resolve_precision
from distcifar.train import train
from distcifar.utilization import train_flops_per_image
from distcifar.validation import Validator
from support import TINY_MODEL_CONFIG


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
    _, grad_norm = train_step(
        accelerator, model, optimizer, [(images, labels)], OptimConfig(label_smoothing=0.0, grad_clip=clip), False
    )
    update = math.sqrt(sum(float((b - p.detach()).pow(2).sum()) for b, p in zip(before, model.parameters())))
    assert float(grad_norm) == pytest.approx(raw_norm, rel=1e-5)
    assert update == pytest.approx(clip, rel=1e-4)


def test_under_accumulation_the_gradient_is_clipped_once_per_optimizer_step(fresh_accelerate_state):
    # Clipping a micro-batch's partial sum would clip another vector: the clipped step must be the whole
    # batch's mean gradient, scaled to the clip norm, and the reported norm that mean gradient's.
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, images, labels = _linear_problem()
    reference = torch.nn.Linear(6, 4)
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(images), labels).backward()
    whole = [r.grad for r in reference.parameters()]
    whole_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in whole))
    first_half = torch.nn.Linear(6, 4)
    first_half.load_state_dict(model.state_dict())
    (F.cross_entropy(first_half(images[:4]), labels[:4]) / 2).backward()
    clip = whole_norm / 4
    half_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in first_half.parameters()))
    assert half_norm > 1.5 * clip, "the first micro-batch alone must be over the limit, or the test proves nothing"
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    micro = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    before = [p.detach().clone() for p in model.parameters()]
    _, grad_norm = train_step(
        accelerator, model, optimizer, micro, OptimConfig(label_smoothing=0.0, grad_clip=clip), want_grad_norm=False
    )
    assert float(grad_norm) == pytest.approx(whole_norm, rel=1e-5)
    for b, p, g in zip(before, model.parameters(), whole):
        torch.testing.assert_close(b - p.detach(), g * (clip / whole_norm), rtol=1e-4, atol=1e-7)


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


@pytest.mark.parametrize("gpu, expected", [("t4", "fp16"), ("a100", "bf16")])
def test_mixed_precision_auto_on_a_gpu_counts_only_native_bf16(monkeypatch, gpu, expected):
    # No GPU here: torch's own query answers as it does on that card. A T4 or V100 (the seed's own GPU is a
    # T4) runs bf16 only by emulation, which torch counts as "supported" unless asked for native support.
    native = gpu == "a100"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert resolve_precision("auto", on_gpu=True) == expected
    assert resolve_precision("bf16", on_gpu=True) == "bf16"  # asked for by name: as asked


def _cadence(save_every: int = 0, eval_every_epochs: float = 1.0, steps_per_epoch: int = 8, total_steps: int = 16):
    return Cadence(steps_per_epoch, total_steps, 50, eval_every_epochs, save_every, 1)


@pytest.mark.parametrize("every_steps, expected", [(0, [8, 16]), (5, [5, 8, 10, 15, 16]), (4, [4, 8, 12, 16])])
def test_saves_fall_at_epoch_ends_the_end_and_every_n_steps(every_steps, expected):
    cadence = _cadence(save_every=every_steps)  # 8 steps per epoch, 16 in all
    assert [step for step in range(1, 17) if cadence.saves(step)] == expected
    cfg = Config()
    cfg.checkpoint.every_steps = every_steps
    assert Cadence.for_run(cfg, 8, 16, on_cpu=True) == cadence  # the run's settings, and on a CPU agreeing every step
    assert Cadence.for_run(cfg, 8, 16, on_cpu=False).agree_every == 10


def test_the_checkpoint_timer_and_never_two_saves_at_one_step(tmp_path, fresh_accelerate_state, monkeypatch):
    cfg, accelerator, parts, tracker = _tiny_run(tmp_path, log_every=100)
    cfg.checkpoint.every_minutes = 1.0
    checkpoints = Checkpointer.for_run(accelerator, cfg, parts)
    assert not checkpoints.timer_expired()
    monkeypatch.setattr(checkpoints, "saved_at", checkpoints.saved_at - 61)
    assert checkpoints.timer_expired()
    assert checkpoints.save(3, {"step": 3}) == tmp_path / "checkpoints" / "step_00000003"
    assert not checkpoints.timer_expired()  # a save restarts the timer
    assert checkpoints.save(3, {"step": 3}) is None  # already saved at this step (the step resumed from, say)
    tracker.finish()


class _SignalAtSecondAgreement:
    """A StopRequest that has seen SIGTERM from the second time the loop asks on."""

    def __init__(self):
        self.asked = 0

    @property
    def signum(self) -> int:
        self.asked += 1
        return 15 if self.asked >= 2 else 0


def _validator(accelerator, cfg, parts, tracker) -> Validator:
    sample = Split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    return Validator(accelerator, cfg, parts, tracker, sample, "test")


def test_a_stop_signal_saves_the_step_it_is_agreed_at_and_ends_the_loop(tmp_path, fresh_accelerate_state):
    # train.py's loop on the real run (tiny network, 4 steps per epoch), a SIGTERM seen at step 2's agreement
    cfg, accelerator, parts, tracker = _tiny_run(tmp_path, log_every=100)
    checkpoints, progress = Checkpointer.for_run(accelerator, cfg, parts), Progress()
    validator = _validator(accelerator, cfg, parts, tracker)
    result, signum = train(
        accelerator, cfg, parts, progress, validator, checkpoints, tracker, _SignalAtSecondAgreement()
    )
    tracker.finish()
    assert signum == 15 and progress.step == 2 and result is None  # step 2 is neither an epoch end nor evaluated
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000002"]


class _Clock:
    """time.monotonic for the checkpointer: it moves only when the test moves it."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "every_minutes, expected",
    [
        # The clock moves 10 s after each step, so the check of step k sees 10 (k - 1) s since the start and
        # 10 (k - s) s since a save at step s; the epoch-end saves (8, 16) restart the timer like any other save.
        (0.5, [4, 7, 8, 11, 14, 16]),  # 30 s: at step 4, 3 steps after each save
        (1.0, [7, 8, 14, 16]),  # 60 s: at step 7, then 6 steps after the epoch end
        (2.0, [8, 16]),  # 120 s: never within an 8-step epoch
    ],
)
def test_the_checkpoint_timer_counts_minutes_since_the_last_save(
    tmp_path, fresh_accelerate_state, monkeypatch, every_minutes, expected
):
    # train.py's loop on the real run (tiny network, 64 images, batch 8: 8 steps per epoch, 16 in all), with the
    # checkpointer's clock moved 10 s after each step: a save lands exactly where the minutes say
    import distcifar.checkpoint

    clock = _Clock()
    monkeypatch.setattr(distcifar.checkpoint, "time", clock)
    cfg, accelerator, parts, tracker = _tiny_run(tmp_path, log_every=100, batch_size=8, lr=0.01)
    cfg.checkpoint.every_minutes, cfg.checkpoint.keep = every_minutes, 100
    checkpoints = Checkpointer.for_run(accelerator, cfg, parts)
    saved = []
    save = checkpoints.save

    def save_and_note(step, *args):
        saved.append(step)
        return save(step, *args)

    checkpoints.save = save_and_note

    def ticking(*args):  # the clock moves once the driver is done with a step
        for report in optimizer_steps(*args):
            yield report
            clock.now += 10

    monkeypatch.setattr(distcifar.train, "optimizer_steps", ticking)
    validator = _validator(accelerator, cfg, parts, tracker)
    train(accelerator, cfg, parts, Progress(), validator, checkpoints, tracker, SimpleNamespace(signum=0))
    tracker.finish()
    assert saved == expected
    assert sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step_*")) == expected


def test_evaluate_counts_true_rows_and_predicted_columns_and_the_mean_loss(accelerator):
    class Fixed(torch.nn.Module):  # always the same logits: class 2 most likely, then class 0
        def forward(self, images):
            return torch.tensor([[1.0, 0.0, 3.0]]).expand(len(images), 3)

    labels = torch.tensor([0, 2, 2, 1, 2])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), labels), batch_size=2
    )
    result = evaluate(accelerator, Fixed(), loader, num_classes=3)
    assert result["confusion"] == [[0, 0, 1], [0, 0, 1], [0, 0, 3]]  # rows: true class, columns: predicted
    assert result["per_class_accuracy"] == [0.0, 0.0, 1.0]
    assert result["eval_accuracy"] == 3 / 5 and result["eval_samples"] == 5
    log_p = torch.tensor([1.0, 0.0, 3.0]).log_softmax(0)
    assert result["eval_loss"] == pytest.approx(-(log_p[0] + log_p[1] + 3 * log_p[2]).item() / 5)


def test_evaluation_runs_the_module_not_its_torch_compile_wrapper(accelerator):
    # Under train.compile the compiled model would recompile for evaluation's batch size and no_grad.
    compiled_graphs = []

    def counting_backend(graph_module, example_inputs):  # torch.compile's custom-backend interface
        compiled_graphs.append(graph_module)
        return graph_module.forward

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])
        ),
        batch_size=4,
    )
    compiled = torch.compile(module, backend=counting_backend)
    result = evaluate(accelerator, compiled, loader, num_classes=3)
    assert result["eval_samples"] == 6
    assert compiled_graphs == [], "evaluate ran the compiled wrapper"
    compiled(torch.randn(2, 3, 32, 32))  # the wrapper does compile when it is called: the counter works
    assert len(compiled_graphs) == 1


def _tiny_run(
    tmp_path,
    log_every: int,
    grad_clip: float = 0.0,
    batch_size: int = 16,
    lr: float = 0.2,
    ema_decay: float = 0.0,
    configure=None,
):
    """A real build of the tiny network on 64 random images, batch 16 (4 steps per epoch), 2 epochs; `configure`
    changes the config before the build."""
    cfg = Config(output_dir=str(tmp_path), model=TINY_MODEL_CONFIG)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.log_every, cfg.train.mixed_precision = (
        2,
        batch_size,
        log_every,
        "no",
    )
    cfg.optim.grad_clip, cfg.optim.lr = grad_clip, lr
    cfg.train.ema_decay = ema_decay
    cfg.tracking.report_to, cfg.tracking.plots = "none", False
    if configure:
        configure(cfg)
    accelerator = build_accelerator(cfg)
    parts = build_training(cfg, accelerator, *_tiny_splits())
    return cfg, accelerator, parts, tracking.Tracker(accelerator, cfg, tmp_path, None, {})


def _tiny_splits() -> tuple[Split, Split]:
    """64 random training images, the first 16 of them the evaluation split."""
    generator = torch.Generator().manual_seed(0)
    train = Split(
        torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (64,), generator=generator),
    )
    return train, train.head(16)


class HostReads(TorchDispatchMode):
    """Counts the operations that make a GPU wait: a value read back to the host (.item(), float(), bool() of a
    tensor) and a tensor made from host data (torch.tensor(...), a host-to-device copy on a GPU)."""

    SYNCING = ("aten._local_scalar_dense", "aten.lift_fresh")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCING):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _steps(cfg, accelerator, parts, tracker, progress):
    """The real optimizer_steps of a _tiny_run, their rows logged as train.py's loop logs them."""
    for report in optimizer_steps(accelerator, parts, cfg.optim, progress):
        for row in report.rows:
            tracker.log(row, step=report.step)
        yield report


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_steps_that_do_not_log_read_nothing_back_from_the_device(tmp_path, fresh_accelerate_state, grad_clip):
    # One process, on the CPU: there the stop/timer agreement runs every step (on a GPU every 10), so this
    # covers it too. Steps 1-3 of the first epoch: no logging step (log_every 100), no epoch end.
    cfg, accelerator, parts, tracker = _tiny_run(tmp_path, log_every=100, grad_clip=grad_clip)
    state = Progress()
    steps = _steps(cfg, accelerator, parts, tracker, state)
    next(steps)  # the first step builds the epoch's order and the optimizer state
    with HostReads() as reads:
        next(steps), next(steps)
    assert state.step == 3 and reads.seen == []
    with HostReads() as reads:  # an epoch end waits for the device: on the CPU that is no operation
        next(steps)
    assert state.step == 4 and reads.seen == []
    tracker.finish()


def test_training_seconds_leave_out_what_the_driver_does_between_steps(tmp_path, fresh_accelerate_state):
    cfg, accelerator, parts, tracker = _tiny_run(tmp_path, log_every=2)
    state = Progress()
    pause = 0.1  # an evaluation or a save, say
    step_ends = []
    for _ in _steps(cfg, accelerator, parts, tracker, state):
        step_ends.append(time.monotonic())
        time.sleep(pause)
    tracker.finish()
    assert state.step == 8
    # wall time is read at each step's end: it holds the 7 pauses between the 8 steps, training time none
    assert state.wall_seconds - state.train_seconds == pytest.approx(7 * pause, abs=0.05)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [row["train/epoch_seconds"] for row in rows if "train/epoch_seconds" in row]
    assert len(epochs) == 2 and sum(epochs) == pytest.approx(state.train_seconds)
    # the second epoch (steps 5-8) took its steps plus the 4 pauses after steps 4-7; its seconds leave those out.
    # Measured against the clock, not a fixed bound: a loaded machine's steps may take longer than the pauses.
    assert epochs[1] == pytest.approx(step_ends[7] - step_ends[3] - 4 * pause, abs=0.05)


def test_log_rows_carry_tflops_and_utilisation_and_epoch_rows_the_peak_memory(tmp_path, fresh_accelerate_state):
    cfg, accelerator, parts, tracker = _tiny_run(tmp_path, log_every=2)
    compute = parts.compute
    assert compute.flops_per_image == train_flops_per_image(TINY_MODEL_CONFIG) and compute.precision == "fp32"
    assert compute.peak_tflops > 0 and "matmul measured at start" in compute.peak_source  # a CPU: measured
    state = Progress()
    memory = [report.peak_memory_gb for report in _steps(cfg, accelerator, parts, tracker, state)]
    tracker.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in logged] == [2, 4, 6, 8]
    for row in logged:
        tflops = row["train/images_per_second"] * compute.flops_per_image / 1e12
        assert row["train/tflops"] == pytest.approx(tflops, rel=1e-12)
        assert row["train/mfu"] == pytest.approx(tflops / compute.peak_tflops, rel=1e-12)
    epochs = [row for row in rows if "train/epoch_seconds" in row]
    assert [row["step"] for row in epochs] == [4, 8]
    assert [row["system/peak_memory_gb"] for row in epochs] == [memory[3], memory[7]]
    assert memory[3] > 0.1 and memory[7] >= memory[3]  # this process's peak so far (torch alone holds more)
    assert memory[:3] == [None] * 3  # read at epoch ends only


def _linear_on_images(seed: int):
    """A linear model of the pixels (neither mirror- nor shift-invariant), 6 random images in batches of 4."""
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (6,), generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    return model, images, labels, loader


def test_hflip_evaluation_averages_the_logits_of_each_image_and_its_mirror(accelerator):
    model, images, labels, loader = _linear_on_images(3)
    with torch.no_grad():
        by_hand = (model(normalize(images)) + model(normalize(torch.flip(images, dims=[3])))) / 2
    result = evaluate(accelerator, model, loader, num_classes=4, hflip=True)
    assert result["eval_loss"] == pytest.approx(F.cross_entropy(by_hand, labels).item(), rel=1e-5)
    assert result["eval_accuracy"] * 6 == (by_hand.argmax(1) == labels).sum().item()
    plain = evaluate(accelerator, model, loader, num_classes=4)
    assert plain["eval_loss"] != pytest.approx(result["eval_loss"], rel=1e-5)


def test_translated_evaluation_averages_the_logits_of_six_views_each_image_shifted_one_pixel_both_ways(accelerator):
    model, images, labels, loader = _linear_on_images(4)

    def shifted(x, by):  # reflect-padded by one pixel, then the 32x32 window `by` pixels down and right
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return padded[..., 1 - by : 33 - by, 1 - by : 33 - by]

    views = [images, images.flip(3)]
    views += [shifted(v, by) for v in views for by in (-1, 1)]
    with torch.no_grad():
        by_hand = sum(model(normalize(v)) for v in views) / 6
    result = evaluate(accelerator, model, loader, num_classes=4, hflip=True, translate=True)
    assert result["eval_loss"] == pytest.approx(F.cross_entropy(by_hand, labels).item(), rel=1e-5)
    assert result["eval_accuracy"] * 6 == (by_hand.argmax(1) == labels).sum().item()
    mirrored = evaluate(accelerator, model, loader, num_classes=4, hflip=True)
    assert mirrored["eval_loss"] != pytest.approx(result["eval_loss"], rel=1e-5)


def test_the_weight_average_follows_every_step_weights_and_batchnorm_statistics_alike(tmp_path, fresh_accelerate_state):
    decay = 0.8
    cfg, accelerator, parts, tracker = _tiny_run(tmp_path, log_every=100, ema_decay=decay)
    assert parts.evaluated_model is parts.ema.module  # what evaluations and final/ use
    trained = parts.model
    floats = lambda module: {k: v.clone() for k, v in module.state_dict().items() if v.is_floating_point()}  # noqa: E731
    by_hand = None
    for _ in _steps(cfg, accelerator, parts, tracker, Progress()):
        now = floats(trained)  # weights, BatchNorm running means and variances after this step
        # the first step's weights, then decay x average + (1 - decay) x weights, written out by hand
        by_hand = now if by_hand is None else {k: decay * by_hand[k] + (1 - decay) * now[k] for k in now}
        averaged = floats(parts.ema.module)
        assert averaged.keys() == by_hand.keys() and any("running_var" in k for k in averaged)
        for key in by_hand:
            torch.testing.assert_close(averaged[key], by_hand[key], rtol=1e-5, atol=1e-6, msg=key)
    tracker.finish()
    assert int(parts.ema.n_averaged) == 8
    assert not torch.equal(
        floats(trained)["blocks.0.convs.0.2.running_mean"], by_hand["blocks.0.convs.0.2.running_mean"]
    )


@pytest.mark.parametrize(
    "every, expected",
    [
        (1.0, [195, 390, 585, 780, 800]),  # epoch ends, and the last step (800: train.max_steps)
        (2.0, [390, 780, 800]),
        (0.5, [98, 195, 293, 390, 488, 585, 683, 780, 800]),  # 97.5 steps apart: the nearest step, epoch ends exact
    ],
)
def test_evaluations_fall_at_the_step_nearest_each_multiple_of_eval_every_epochs(every, expected):
    cadence = _cadence(eval_every_epochs=every, steps_per_epoch=195, total_steps=800)
    assert [step for step in range(1, 801) if cadence.evaluates(step)] == expected


def test_the_time_to_a_target_is_the_first_evaluation_reaching_it_and_belongs_to_that_target(fresh_accelerate_state):
    cfg = Config()
    cfg.train.stop_at_accuracy = 0.5
    training = SimpleNamespace(batches=SimpleNamespace(steps_per_epoch=10), total_steps=100)
    validator = Validator(Accelerator(cpu=True), cfg, training, None, None, "test")
    progress = Progress()

    def evaluated(step: int, accuracy: float) -> bool:  # an evaluation at `step`, after step / 10 s of training
        progress.step, progress.train_seconds = step, step / 10
        validator.best_accuracy = max(validator.best_accuracy or 0.0, accuracy)
        return validator.reached_target({"eval_accuracy": accuracy, "epoch": step / 10}, progress)

    assert [evaluated(10, 0.4), evaluated(20, 0.55), evaluated(30, 0.6)] == [False, True, True]
    reached = {"stop_at_accuracy": 0.5, "target_reached": True}
    assert validator.summary({}) == {
        **reached,
        "seconds_to_target": 2.0,
        "steps_to_target": 20,
        "epochs_to_target": 2.0,
    }
    # what a checkpoint carries of it comes back whole in a resumed run's validator
    resumed = Validator(Accelerator(cpu=True), cfg, training, None, None, "test")
    resumed.load_state_dict({"step": 30, **validator.state_dict()})
    assert resumed.summary({}) == validator.summary({})
    # resumed with a higher target: not reached yet, and no time to it until an evaluation reaches it
    cfg.train.stop_at_accuracy = 0.7
    assert not validator.target_reached_before()
    assert validator.summary({})["target_reached"] is False
    assert validator.summary({})["seconds_to_target"] is None
    assert evaluated(40, 0.72) and validator.summary({})["steps_to_target"] == 40
    # resumed with a lower target than one reached: nothing left to train, but its time was never measured
    cfg.train.stop_at_accuracy = 0.6
    assert validator.target_reached_before()
    assert validator.summary({}) == {
        "stop_at_accuracy": 0.6,
        "target_reached": True,
        "seconds_to_target": None,
        "steps_to_target": None,
        "epochs_to_target": None,
    }


def test_an_evaluation_exactly_at_the_target_reaches_it(fresh_accelerate_state):
    cfg = Config()
    cfg.train.stop_at_accuracy = 0.5
    training = SimpleNamespace(batches=SimpleNamespace(steps_per_epoch=10), total_steps=100)
    validator = Validator(Accelerator(cpu=True), cfg, training, None, None, "test")
    assert not validator.reached_target({"eval_accuracy": 0.4999, "epoch": 1.0}, Progress(step=10))
    assert validator.reached_target({"eval_accuracy": 0.5, "epoch": 2.0}, Progress(step=20))
    validator.best_accuracy = 0.5  # and a resumed run whose best is exactly the target trains no further
    assert validator.target_reached_before()


def _evaluated_run(tmp_path, stop_at_accuracy: float = 0.0):
    """The tiny run with a weight average (decay 0.5), evaluated and saved every 2 steps (2 epochs of 4 steps),
    keep_best with keep 1, through train.py's loop: (evaluation rows, {step: manifest accuracy} kept, last step)."""

    def configure(cfg):
        cfg.checkpoint.keep_best, cfg.checkpoint.keep, cfg.checkpoint.every_steps = True, 1, 2
        cfg.train.eval_every_epochs, cfg.train.stop_at_accuracy = 0.5, stop_at_accuracy
        torch.manual_seed(1)  # the same network and dropout in both runs, whatever ran before in this process

    cfg, accelerator, parts, tracker = _tiny_run(tmp_path, log_every=100, ema_decay=0.5, configure=configure)
    progress, validator = Progress(), _validator(accelerator, cfg, parts, tracker)
    checkpoints = Checkpointer.for_run(accelerator, cfg, parts)
    train(accelerator, cfg, parts, progress, validator, checkpoints, tracker, SimpleNamespace(signum=0))
    tracker.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kept = {
        int(folder.name[5:]): json.loads((folder / "manifest.json").read_text())["eval_accuracy"]
        for folder in (tmp_path / "checkpoints").glob("step_*")
    }
    return [row for row in rows if "eval/accuracy" in row], kept, progress.step


def test_with_a_weight_average_evaluations_keep_best_and_the_target_use_the_average(tmp_path, fresh_accelerate_state):
    evaluations, kept, last = _evaluated_run(tmp_path / "whole")
    average = {row["step"]: row["eval/accuracy"] for row in evaluations}
    raw = {row["step"]: row["eval/raw_accuracy"] for row in evaluations}
    assert list(average) == [2, 4, 6, 8] and last == 8
    # keep_best keeps the newest and the step whose average was best (of equals, the newest), each manifest holding
    # the average's accuracy
    best = max(average, key=lambda step: (average[step], step))
    assert kept == {8: average[8], best: average[best]}

    # the target: an accuracy the average first reaches at `first`, where the training weights would stop elsewhere
    def first_reaching(accuracy: dict, target: float) -> int | None:
        return next((step for step in accuracy if accuracy[step] >= target), None)

    telling = [t for t in sorted(set(average.values())) if first_reaching(raw, t) != first_reaching(average, t)]
    assert telling, "the training weights reach every target where the average does: this proves nothing"
    target = telling[0]
    first = first_reaching(average, target)
    evaluations, _, last = _evaluated_run(tmp_path / "target", stop_at_accuracy=target)
    assert last == first and evaluations[-1]["eval/accuracy"] == target
