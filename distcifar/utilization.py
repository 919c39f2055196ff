"""How much of the hardware a run uses: the training FLOPs of one image (counted by PyTorch's FlopCounterMode),
the device's peak in the run's precision (published dense figures for the GPUs of GPU_PEAKS, a matmul measured on
the spot on a CPU), the utilisation the two give, and the most memory a process has held."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distcifar import model as model_module
from distcifar.config import Config, ModelConfig
from distcifar.data import cache_root
from distcifar.files import write_atomically
from distcifar.ranks import decided_by_main_process

# Dense peaks in TFLOP/s by precision, as NVIDIA's datasheets publish them. The datasheets give tensor-core figures
# "with sparsity" (2:4 structured sparsity doubles them); a dense training step gets half, which is what is listed
# here. A precision a GPU does not run natively (bf16 and tf32 before Ampere) is left out: unknown.
_H100 = "NVIDIA H100 datasheet, https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
GPU_PEAKS: list[tuple[str, str, dict[str, float], str]] = [
    # (name, regular expression for torch.cuda.get_device_name() in lower case, peaks, source)
    ("H100 SXM", r"h100.*hbm3", {"fp32": 67, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}, _H100),
    ("H100 PCIe", r"h100.*(pcie|hbm2e)", {"fp32": 51, "tf32": 378, "bf16": 756.5, "fp16": 756.5}, _H100),
    (
        "H200 SXM",
        r"h200(?!.*nvl)",
        {"fp32": 67, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5},
        "NVIDIA H200 Tensor Core GPU specifications, https://www.nvidia.com/en-us/data-center/h200/",
    ),
    (
        "A100",
        r"a100",
        {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312},
        "NVIDIA A100 datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    ),
    (
        "L4",
        r"\bl4\b",
        {"fp32": 30.3, "tf32": 60, "bf16": 121, "fp16": 121},
        "NVIDIA L4 Tensor Core GPU specifications, https://www.nvidia.com/en-us/data-center/l4/",
    ),
    (
        "T4",
        r"\bt4\b",
        {"fp32": 8.1, "fp16": 65},
        "NVIDIA T4 datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/"
        "t4-tensor-core-datasheet-951643.pdf",
    ),
    *(
        (
            name,
            pattern,
            peaks,
            "NVIDIA V100 datasheet, https://images.nvidia.com/content/technologies/volta/pdf/"
            "volta-v100-datasheet-update-us-1165301-r5.pdf",
        )
        for name, pattern, peaks in (
            ("V100S PCIe", r"v100s", {"fp32": 16.4, "fp16": 130}),
            ("V100 PCIe", r"v100-pcie", {"fp32": 14, "fp16": 112}),
            ("V100 SXM2", r"v100-sxm2", {"fp32": 15.7, "fp16": 125}),
        )
    ),
]

MATMUL_SIZE = 2048  # the CPU peak's matmul: large enough for oneDNN's best kernel, ~0.1 s in fp32 on 2 cores
MATMUL_FLOPS = 2 * MATMUL_SIZE**3
START_BUDGET_S = 0.3  # how long train.py spends measuring the CPU peak at start (at least 3 matmuls)


@dataclasses.dataclass
class Compute:
    """What one training image costs and what the hardware can do, for train/tflops and train/mfu."""

    flops_per_image: int  # forward + backward, as FlopCounterMode counts them
    precision: str  # what the convolutions and matmuls run in: fp32, tf32, bf16 or fp16
    peak_tflops: float | None  # of all processes together; None: not known
    peak_source: str  # where the peak comes from, or why it is not known

    def tflops(self, images_per_second: float) -> float:
        return images_per_second * self.flops_per_image / 1e12

    def utilization(self, images_per_second: float) -> float | None:
        """The achieved share of the peak (model FLOPs utilisation), None where the peak is not known."""
        return self.tflops(images_per_second) / self.peak_tflops if self.peak_tflops else None

    def rates(self, images_per_second: float, processes: int) -> dict:
        """The throughput figures of a rate of all processes together, the one source of them for the log rows, the
        summary and the benchmark: images/s, per process, TFLOP/s achieved and the share of the peak (mfu: None
        where the peak is not known)."""
        return {
            "images_per_second": images_per_second,
            "images_per_second_per_process": images_per_second / processes,
            "tflops": self.tflops(images_per_second),
            "mfu": self.utilization(images_per_second),
        }

    def describe(self) -> str:
        """For the run's header: the count, the peak and where it comes from."""
        peak = f"peak {self.peak_tflops:.3g} TFLOP/s" if self.peak_tflops else "peak unknown"
        return (
            f"{self.flops_per_image / 1e9:.3g} GFLOP per training image (forward + backward, FlopCounterMode) | "
            f"{peak} ({self.peak_source})"
        )


def for_run(cfg: Config, accelerator) -> Compute:
    """The run's Compute: the FLOP count from the main process (counted once, or read from the cache), the peak
    from GPU_PEAKS on a GPU (per GPU x processes), or measured by every process at once on a CPU (they share it)."""
    count = decided_by_main_process(accelerator, lambda: train_flops_per_image(cfg.model, cache_root(cfg.data)))
    precision = compute_precision(accelerator)
    if accelerator.device.type == "cuda":
        per_gpu, source = published_peak(torch.cuda.get_device_name(accelerator.device), precision)
        peak = per_gpu * accelerator.num_processes if per_gpu else None
        return Compute(count, precision, peak, source)
    accelerator.wait_for_everyone()  # the processes share the CPU: each measures its part while all are busy
    started = time.perf_counter()
    mine = measure_cpu_peak(precision, START_BUDGET_S)
    seconds = time.perf_counter() - started
    peak = accelerator.reduce(torch.tensor(mine, dtype=torch.float64, device=accelerator.device), "sum").item()
    source = f"{precision} {MATMUL_SIZE}x{MATMUL_SIZE} matmul measured at start in {seconds:.1f} s"
    return Compute(count, precision, peak, source)


def compute_precision(accelerator) -> str:
    """What the network's convolutions and matmuls run in: bf16 or fp16 under mixed precision; otherwise fp32, or
    on a GPU tf32 where cuDNN may use it for convolutions (PyTorch's default on Ampere and newer), since the seed
    network's FLOPs are almost all convolutions."""
    if accelerator.mixed_precision in ("bf16", "fp16"):
        return accelerator.mixed_precision
    device = accelerator.device
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


def published_peak(device_name: str, precision: str) -> tuple[float | None, str]:
    """(dense TFLOP/s of one GPU in `precision`, its source), or (None, why it is not known)."""
    for name, pattern, peaks, source in GPU_PEAKS:
        if re.search(pattern, device_name.lower()):
            if precision not in peaks:
                return None, f"unknown: the {name} has no published {precision} peak"
            return peaks[precision], f"{name} {precision}, published dense peak: {source}"
    return None, f"unknown: no published peak for '{device_name}' in distcifar's table (utilization.GPU_PEAKS)"


def matmuls(precision: str):
    """A generator that does one MATMUL_SIZE-square matmul (MATMUL_FLOPS) on the CPU in `precision` (fp32 or bf16)
    per item: the work a CPU's peak is measured with."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)  # the run's random streams are left alone
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(dtype) for _ in range(2))
    while True:
        torch.mm(a, b)
        yield


def measure_cpu_peak(precision: str, budget_s: float) -> float:
    """The best TFLOP/s of `matmuls` over `budget_s` seconds and at least 3 matmuls. The best, not the mean: other
    jobs on the machine only ever slow it down (and so does the first call's setup)."""
    work = matmuls(precision)
    best, runs, started = 0.0, 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < budget_s:
        before = time.perf_counter()
        next(work)
        best = max(best, MATMUL_FLOPS / (time.perf_counter() - before) / 1e12)
        runs += 1
    return best


def train_flops_per_image(model_cfg: ModelConfig, cache: Path | None = None) -> int:
    """Training FLOPs (forward + backward) of one image through the network `model_cfg` describes, as PyTorch's
    FlopCounterMode counts them: convolutions and matrix products, each by formula from its shapes; the elementwise
    work (BatchNorm, ReLU, pooling, softmax, the weighted sums), the loss and the optimizer step are not counted.

    Counted on the meta device (no memory, no arithmetic, no random numbers drawn) and kept in `cache` (the decoded
    data's cache folder), keyed by the config, the network's source and torch's version: the counter's first use
    imports torch._dynamo, about 3 CPU seconds at every start otherwise."""
    key = hashlib.sha256(
        json.dumps(dataclasses.asdict(model_cfg), sort_keys=True).encode()
        + Path(model_module.__file__).read_bytes()
        + torch.__version__.encode()
    ).hexdigest()[:32]
    path = cache / f"flops-{key}.json" if cache else None
    try:
        return json.loads(path.read_text())["train_flops_per_image"]
    except (AttributeError, OSError, ValueError, KeyError):
        pass  # no cache, or not counted yet
    flops = _count(model_cfg)
    if path:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps({"train_flops_per_image": flops}) + "\n")
        except OSError:  # a read-only cache: count again next time
            pass
    return flops


def _count(model_cfg: ModelConfig, batch: int = 2) -> int:
    from torch.utils.flop_counter import FlopCounterMode  # its first use imports torch._dynamo: only on a cache miss

    with torch.device("meta"):
        network = model_module.DistCifarNet(model_cfg).train()
        images, labels = torch.empty(batch, 3, 32, 32), torch.zeros(batch, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(network(images), labels).backward()
    return counter.get_total_flops() // batch


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held so far, in GB (1e9 bytes): on a GPU what PyTorch's allocator has
    handed out (torch.cuda.max_memory_allocated), on a CPU the process's peak resident set (getrusage's maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports kilobytes
