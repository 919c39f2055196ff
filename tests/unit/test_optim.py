"""Proves the learning-rate schedules and optimizer groups against hand-computed numbers, not against optim.py
itself."""

import pytest
import torch
from torch import nn

from distcifar.config import OptimConfig
from distcifar.model import DistCifarNet
from distcifar.optim import build_optimizer, build_scheduler
from support import TINY_MODEL_CONFIG as TINY


def _lrs_used(cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> list[float]:
    """The learning rate each optimizer step used, stepping optimizer and scheduler the way train.py does."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, total_steps)
    used = []
    for _ in range(total_steps):
        lr = scheduler.get_last_lr()
        assert len(set(lr)) == 1 and [g["lr"] for g in optimizer.param_groups] == lr  # every group, one rate
        used.append(lr[0])
        optimizer.step()
        scheduler.step()
    return used


# Base lr 0.1, 10 steps per epoch, 100 steps. Warm-up of 2 epochs = 20 steps, linear: step s uses 0.1 * (s + 1) / 20.
# cosine after warm-up W: 0.1 * 0.5 * (1 + cos(pi * (s - W) / (100 - W))); cos(pi/4) = 0.70710678.
# onecycle after warm-up W: 0.1 * (1 - (s - W) / (100 - W)). step: 0.1 * 0.5 ** (s // 30), counted from step 0.
HAND = {
    ("constant", 0): {0: 0.1, 9: 0.1, 50: 0.1, 99: 0.1},
    ("constant", 2): {0: 0.005, 9: 0.05, 19: 0.1, 20: 0.1, 59: 0.1, 99: 0.1},
    ("step", 0): {0: 0.1, 29: 0.1, 30: 0.05, 59: 0.05, 60: 0.025, 89: 0.025, 90: 0.0125, 99: 0.0125},
    ("step", 2): {0: 0.005, 9: 0.05, 19: 0.1, 20: 0.1, 29: 0.1, 30: 0.05, 60: 0.025, 99: 0.0125},
    # progress s/100: 0.25 -> 0.5 * (1 + 0.70710678); 0.99 -> 0.5 * (1 - cos(0.01 pi)) = 2.4672e-4
    ("cosine", 0): {0: 0.1, 25: 0.08535533906, 50: 0.05, 75: 0.01464466094, 99: 2.467198171e-05},
    # progress (s - 20)/80: step 40 -> 0.25; 59 -> 39/80 -> 0.5 * (1 + sin(0.0125 pi)); 60 -> 0.5; 80 -> 0.75;
    # 99 -> 79/80 -> 0.5 * (1 - cos(0.0125 pi))
    ("cosine", 2): {
        0: 0.005,
        9: 0.05,
        19: 0.1,
        20: 0.1,
        40: 0.08535533906,
        59: 0.05196299079,
        60: 0.05,
        80: 0.01464466094,
        99: 3.854818796e-05,
    },
    ("onecycle", 0): {0: 0.1, 25: 0.075, 50: 0.05, 99: 0.001},
    ("onecycle", 2): {0: 0.005, 9: 0.05, 19: 0.1, 20: 0.1, 40: 0.075, 60: 0.05, 99: 0.00125},
}


@pytest.mark.parametrize("schedule, warmup_epochs", list(HAND))
def test_schedule_matches_hand_computed_learning_rates(schedule, warmup_epochs):
    cfg = OptimConfig(name="sgd", lr=0.1, schedule=schedule, warmup_epochs=warmup_epochs, step_epochs=3, step_gamma=0.5)
    used = _lrs_used(cfg, steps_per_epoch=10, total_steps=100)
    for step, expected in HAND[schedule, warmup_epochs].items():
        assert used[step] == pytest.approx(expected, rel=1e-6, abs=1e-12), f"step {step}"
    if schedule != "constant":  # never rises after the warm-up
        after = used[round(warmup_epochs * 10) :]
        assert all(b <= a + 1e-15 for a, b in zip(after, after[1:]))


def test_the_tests_tiny_run_schedule():
    """conftest's train_args: lr 0.003, 8 steps an epoch, 16 steps, cosine with half an epoch (4 steps) of warm-up.
    These are the rates train.py logs for that run (step k in the log is index k-1 here)."""
    cfg = OptimConfig(name="adam", lr=0.003, schedule="cosine", warmup_epochs=0.5)
    used = _lrs_used(cfg, steps_per_epoch=8, total_steps=16)
    # warm-up 0.003 * (s+1)/4; then progress (s-4)/12: 8/12 -> 0.25; 11/12 -> 0.5 * (1 - cos(pi/12)) = 0.0170371
    expected = {0: 0.00075, 1: 0.0015, 2: 0.00225, 3: 0.003, 4: 0.003, 10: 0.0015, 12: 0.00075, 15: 5.11112606e-05}
    for step, lr in expected.items():
        assert used[step] == pytest.approx(lr, rel=1e-6), f"step {step}"


def _decayed_by_hand(model: nn.Module) -> set[str]:
    """Names of the conv and linear weights: the only parameters that should get weight decay."""
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }


def _groups_by_name(model: nn.Module, optimizer) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_only_on_conv_and_linear_weights(name):
    model = DistCifarNet(TINY)
    optimizer = build_optimizer(model, OptimConfig(name=name, weight_decay=5e-4))
    all_names = [n for n, _ in model.named_parameters()]
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())  # every parameter in exactly one group
    decayed = set().union(*(names for wd, names in _groups_by_name(model, optimizer) if wd > 0))
    not_decayed = set().union(*(names for wd, names in _groups_by_name(model, optimizer) if wd == 0))
    assert {wd for wd, names in _groups_by_name(model, optimizer) if names} == {5e-4, 0.0}
    assert decayed == _decayed_by_hand(model)
    assert not_decayed == set(all_names) - decayed
    # Spot checks by name: a conv weight, a linear weight decay; BatchNorm scale/shift and biases do not.
    assert {"stem.0.weight", "blocks.0.skip.weight", "blocks.5.experts.fc2.weight", "classifier.2.weight"} <= decayed
    assert {"stem.0.bias", "blocks.0.convs.0.2.weight", "blocks.0.convs.0.2.bias", "classifier.5.bias"} <= not_decayed


def test_decay_norm_and_bias_puts_every_parameter_under_decay():
    model = DistCifarNet(TINY)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", weight_decay=1e-3, decay_norm_and_bias=True))
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())
    assert all(g["weight_decay"] == 1e-3 for g in optimizer.param_groups if g["params"])


def test_decay_shrinks_exactly_the_decayed_parameters():
    """Plain SGD, zero gradients: one step multiplies a decayed weight by (1 - lr * wd) and leaves the rest alone."""
    model = DistCifarNet(TINY)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, 0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decayed = _decayed_by_hand(model)
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if name in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


@pytest.mark.parametrize(
    "kwargs, cls, expected",
    [
        (
            dict(name="sgd", lr=0.2, momentum=0.9, nesterov=True),
            torch.optim.SGD,
            dict(lr=0.2, momentum=0.9, nesterov=True),
        ),
        (
            dict(name="sgd", lr=0.05, momentum=0.8, nesterov=False),
            torch.optim.SGD,
            dict(lr=0.05, momentum=0.8, nesterov=False),
        ),
        # Nesterov needs momentum; with none it is plain SGD rather than an error.
        (
            dict(name="sgd", lr=0.1, momentum=0.0, nesterov=True),
            torch.optim.SGD,
            dict(lr=0.1, momentum=0.0, nesterov=False),
        ),
        (dict(name="adam", lr=0.003), torch.optim.Adam, dict(lr=0.003, betas=(0.9, 0.999))),
        (dict(name="adamw", lr=0.001), torch.optim.AdamW, dict(lr=0.001, betas=(0.9, 0.999))),
    ],
)
def test_optimizer_choice_and_hyper_parameters(kwargs, cls, expected):
    cfg = OptimConfig(weight_decay=0.01, **kwargs)
    optimizer = build_optimizer(DistCifarNet(TINY), cfg)
    assert type(optimizer) is cls  # AdamW subclasses Adam: not isinstance
    for group in optimizer.param_groups:
        for key, value in expected.items():
            assert group[key] == value, key
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.01]


def _one_weight_after(cfg: OptimConfig, grads, start=1.0):
    model = nn.Linear(1, 1, bias=False)  # a 2-D weight: in the decayed group
    with torch.no_grad():
        model.weight.fill_(start)
    optimizer = build_optimizer(model, cfg)
    for g in grads:
        model.weight.grad = torch.full_like(model.weight, g)
        optimizer.step()
    return model.weight.item()


def test_nesterov_and_momentum_change_the_update_as_the_formulas_say():
    # Gradient 1 twice, lr 0.1, momentum 0.9. Heavy ball: buf 1 -> 1.9; w = 1 - 0.1 - 0.19 = 0.71.
    # Nesterov: step uses g + 0.9 * buf: 1.9 then 1 + 0.9 * 1.9 = 2.71; w = 1 - 0.19 - 0.271 = 0.539.
    # No momentum: w = 1 - 0.1 - 0.1 = 0.8.
    base = dict(name="sgd", lr=0.1, weight_decay=0.0)
    assert _one_weight_after(OptimConfig(momentum=0.9, nesterov=False, **base), [1, 1]) == pytest.approx(0.71)
    assert _one_weight_after(OptimConfig(momentum=0.9, nesterov=True, **base), [1, 1]) == pytest.approx(0.539)
    assert _one_weight_after(OptimConfig(momentum=0.0, nesterov=True, **base), [1, 1]) == pytest.approx(0.8)


def test_adam_couples_weight_decay_into_the_gradient_and_adamw_decouples_it():
    # Weight 1, gradient 0, lr 0.1, weight decay 0.1, one step.
    # Adam (L2): gradient becomes 0.1; the bias-corrected step is lr * m / sqrt(v) = 0.1 -> 0.9.
    # AdamW: weight *= 1 - lr * wd = 0.99; the zero gradient moves nothing -> 0.99.
    assert _one_weight_after(OptimConfig(name="adam", lr=0.1, weight_decay=0.1), [0]) == pytest.approx(0.9, rel=1e-5)
    assert _one_weight_after(OptimConfig(name="adamw", lr=0.1, weight_decay=0.1), [0]) == pytest.approx(0.99, rel=1e-6)
