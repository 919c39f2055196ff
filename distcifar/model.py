"""The seed network: a conv stem, six expert-weighted conv blocks and an MLP classifier.

Each block runs a short chain of conv -> ReLU -> BatchNorm layers, keeps every layer's
output, and mixes them with per-image weights from a small "expert branch"
(global pool -> FC -> ReLU -> FC -> softmax) computed from the block's input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from distcifar.config import ModelConfig


class ExpertBranch(nn.Module):
    """Per-image softmax weights over the `num_experts` conv outputs of a block."""

    def __init__(self, channels: int, num_experts: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.softmax(self.fc2(F.relu(self.fc1(pooled))), dim=1)


class Block(nn.Module):
    def __init__(self, num_convs: int, cin: int, cout: int, reduction: int, half_dim: bool):
        super().__init__()
        self.experts = ExpertBranch(cin, num_convs, reduction)
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.BatchNorm2d(cout),
            )
            for i in range(num_convs)
        )
        self.skip = nn.Conv2d(cin, cout, 1)
        self.pool = nn.AvgPool2d(2) if half_dim else nn.Identity()
        # The expert weights of the last forward pass, detached, for logging without a second forward.
        self.last_expert_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.experts(x)  # [batch, num_convs]
        self.last_expert_weights = weights.detach()
        out = self.skip(x)
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h)
            out = out + weights[:, i, None, None, None].to(h.dtype) * h
        return self.pool(F.relu(out))


def parameter_count(module: nn.Module) -> int:
    """The trainable numbers of a network (BatchNorm's running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())


class DistCifarNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="distcifar",
    tags=["image-classification", "cifar10"],
):
    """The seed network. `DistCifarNet.from_pretrained(dir)` loads an export written by train.py."""

    def __init__(self, config: ModelConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = ModelConfig()
        elif isinstance(config, dict):  # from_pretrained passes config.json back as a dict
            config = ModelConfig(**config)
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(12, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=4, stride=2, padding=1),  # 32x32 -> 16x16
        )
        blocks, cin = [], 32
        for num_convs, cout, half in zip(config.block_convs, config.block_channels, config.block_halve):
            blocks.append(Block(num_convs, cin, cout, config.expert_reduction, half))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        head, width = [nn.AdaptiveAvgPool2d(2), nn.Flatten()], cin * 4
        for hidden in config.classifier_hidden:
            head += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout)]
            width = hidden
        head.append(nn.Linear(width, config.num_classes))
        self.classifier = nn.Sequential(*head)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.stem(x)))

    def generate_model_card(self, *args, **kwargs):
        """The card that save_pretrained and push_to_hub write (README.md): distcifar.export.model_card, with the
        run's config and summary when train.py passes them as model_card_kwargs."""
        from distcifar.export import model_card  # export imports this module

        return model_card(self, **kwargs)

    def expert_weights(self) -> list[torch.Tensor]:
        """Each block's expert weights [batch, num_convs] from the last forward pass."""
        return [block.last_expert_weights for block in self.blocks]


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of the model's weights and inputs: channels_last (train.channels_last) or plain NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format


def uncompiled(module: nn.Module) -> nn.Module:
    """The module inside a torch.compile wrapper, or `module` itself: evaluation and logging run it as it is,
    because the compiled one would recompile for eval mode. A DDP wrapper inside stays."""
    return getattr(module, "_orig_mod", module)
