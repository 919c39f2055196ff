"""Where the time and memory go, in the pytest process: the FLOP count against the network's FLOPs worked out by
hand, its cache, the published GPU peaks found by device name, the precision a peak is taken for, the peak memory
against the kernel's own record, and the flags train.deterministic sets. The profiler's trace of a real run is read
in tests/launch/test_train.py; the benchmark's FLOP figures in tests/launch/test_benchmark.py."""

import os
import types

import psutil
import pytest
import torch

from distcifar import utilization
from distcifar.accelerator import CUBLAS_WORKSPACE, build_accelerator, set_determinism
from distcifar.config import Config, ModelConfig
from distcifar.utilization import compute_precision, peak_memory_gb, published_peak, train_flops_per_image
from support import TINY_MODEL_CONFIG


def flops_by_hand(cfg: ModelConfig) -> int:
    """The seed network's training FLOPs per image from its config: a multiply-add is 2 FLOPs; a conv layer does
    k*k*c_in multiply-adds for each of its c_out*h*w outputs, a linear layer in*out. The backward pass does each
    layer's work twice more (the gradient of its input, and of its weight), except that nothing needs the gradient
    of the image, so the first conv's input gradient is not computed."""

    def conv(c_in, c_out, k, size):
        return 2 * k * k * c_in * c_out * size * size

    def linear(n_in, n_out):
        return 2 * n_in * n_out

    first = conv(3, 12, 3, 32)
    forward = first + conv(12, 32, 3, 32)  # the stem, at 32x32; then a pool to 16x16
    size, c_in = 16, 32
    for convs, c_out, halve in zip(cfg.block_convs, cfg.block_channels, cfg.block_halve):
        hidden = c_in // cfg.expert_reduction
        forward += linear(c_in, hidden) + linear(hidden, convs)  # the expert branch, on the pooled input
        forward += conv(c_in, c_out, 1, size)  # the 1x1 skip
        forward += sum(conv(c_in if i == 0 else c_out, c_out, 3, size) for i in range(convs))
        size, c_in = size // 2 if halve else size, c_out  # pooling comes after the block's convs
    width = c_in * 2 * 2  # the head's 2x2 pool, flattened
    for hidden in [*cfg.classifier_hidden, cfg.num_classes]:
        forward += linear(width, hidden)
        width = hidden
    return 3 * forward - first


@pytest.mark.parametrize("cfg", [ModelConfig(), TINY_MODEL_CONFIG], ids=["seed", "tiny"])
def test_flop_count_equals_the_networks_convolutions_and_matmuls_worked_out_by_hand(cfg):
    # What the counter leaves out (so the hand count does too): BatchNorm, ReLU, pooling, softmax, the expert-weighted
    # sums, biases, the loss and the optimizer step: elementwise work, a few percent of a step's arithmetic here.
    counted = train_flops_per_image(cfg)
    assert counted == flops_by_hand(cfg)
    if cfg == ModelConfig():
        assert counted == pytest.approx(1.584e9, rel=1e-3)  # the figure the docs quote


def test_the_flop_count_is_kept_per_network_config(tmp_path, monkeypatch):
    seed = train_flops_per_image(ModelConfig(), tmp_path)
    assert [p.name.startswith("flops-") for p in tmp_path.iterdir()] == [True]

    def no_count(cfg):
        raise AssertionError("counted again although the count is kept")

    monkeypatch.setattr(utilization, "_count", no_count)
    assert train_flops_per_image(ModelConfig(), tmp_path) == seed
    monkeypatch.undo()
    tiny = train_flops_per_image(TINY_MODEL_CONFIG, tmp_path)  # another network: its own count
    assert tiny == flops_by_hand(TINY_MODEL_CONFIG) and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    "device_name, precision, expected",
    [
        # dense figures of the vendors' datasheets (tensor-core figures "with sparsity" halved)
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
        ("NVIDIA H100 80GB HBM3", "fp32", 67),
        ("NVIDIA H100 PCIe", "tf32", 378),
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156),
        ("NVIDIA A100 80GB PCIe", "bf16", 312),
        ("NVIDIA L4", "fp16", 121),
        ("Tesla T4", "fp16", 65),
        ("Tesla V100-SXM2-16GB", "fp16", 125),
        ("Tesla V100-PCIE-32GB", "fp32", 14),
        ("Tesla V100S-PCIE-32GB", "fp16", 130),
        # not in the table, or no such peak: unknown, never a neighbour's figure
        ("Tesla T4", "bf16", None),
        ("Tesla V100-SXM2-16GB", "tf32", None),
        ("NVIDIA L40S", "bf16", None),
        ("NVIDIA H100 NVL", "bf16", None),
        ("NVIDIA H200 NVL", "bf16", None),
        ("NVIDIA A10", "bf16", None),
        ("NVIDIA GeForce RTX 4090", "bf16", None),
    ],
)
def test_published_peaks_are_found_by_device_name_and_unknown_ones_said_so(device_name, precision, expected):
    peak, source = published_peak(device_name, precision)
    assert peak == expected, source
    assert ("datasheet" in source or "specifications" in source) if expected else source.startswith("unknown")


@pytest.mark.parametrize(
    "mixed_precision, capability, tf32_convolutions, expected",
    [
        ("bf16", (9, 0), True, "bf16"),
        ("fp16", (7, 5), True, "fp16"),
        ("no", (8, 0), True, "tf32"),  # PyTorch lets cuDNN use TF32 for convolutions by default
        ("no", (8, 0), False, "fp32"),
        ("no", (7, 0), True, "fp32"),  # a V100 has no TF32
    ],
)
def test_a_gpus_peak_is_taken_for_the_precision_its_convolutions_run_in(
    monkeypatch, mixed_precision, capability, tf32_convolutions, expected
):
    # No GPU here: the capability torch reports for one, and PyTorch's own TF32 switch for cuDNN
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32_convolutions)
    gpu = types.SimpleNamespace(mixed_precision=mixed_precision, device=torch.device("cuda", 0))
    assert compute_precision(gpu) == expected


@pytest.mark.parametrize("mixed_precision, expected", [("no", "fp32"), ("bf16", "bf16")])
def test_a_cpus_peak_is_taken_for_fp32_or_bf16(mixed_precision, expected):
    cpu = types.SimpleNamespace(mixed_precision=mixed_precision, device=torch.device("cpu"))
    assert compute_precision(cpu) == expected


def test_peak_memory_on_a_cpu_is_the_processes_peak_resident_set():
    held = torch.ones(300 * 2**20 // 4)  # 300 MB, written: resident
    holding = psutil.Process().memory_info().rss / 1e9
    del held
    after = psutil.Process().memory_info().rss / 1e9
    peak = peak_memory_gb(torch.device("cpu"))
    # the peak, not what is resident now (the kernel's counters lag a few pages behind: 10 MB of slack)
    assert peak > holding - 0.01 and holding > after + 0.25
    with open("/proc/self/status") as status:  # the kernel's own record of the peak resident set
        high_water = next(int(line.split()[1]) * 1024 / 1e9 for line in status if line.startswith("VmHWM:"))
    assert peak == pytest.approx(high_water, rel=0.02)


@pytest.fixture
def restored_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    set_determinism(False, on_gpu=False)  # PyTorch's defaults


@pytest.mark.parametrize("on_gpu", [True, False], ids=["gpu", "cpu"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
def test_train_deterministic_sets_the_flags_it_promises(restored_determinism, deterministic, on_gpu):
    set_determinism(not deterministic, on_gpu)  # an earlier setting in this process, to be overridden
    set_determinism(deterministic, on_gpu)
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is (on_gpu and not deterministic)  # the kernel search: GPUs, for speed
    if deterministic:  # what torch.use_deterministic_algorithms needs from cuBLAS on CUDA >= 10.2
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


def test_the_config_reaches_the_flags(tmp_path, fresh_accelerate_state, restored_determinism):
    cfg = Config(output_dir=str(tmp_path))
    cfg.train.deterministic = True
    build_accelerator(cfg)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
