"""The seed-000 network: a 2D U-Net with a shared-weight encoder and attention fusion.

Architecture (seed 000 section 2.2.1; layout of the published ``SharedAttnUNet``):

* one encoder, shared by every input contrast: three levels of ``residual_block`` (3×3 conv –
  InstanceNorm – ReLU – 3×3 conv – InstanceNorm, plus a 1×1 ``residual_connection``
  projection of the block's input, summed, then ReLU) followed by a stride-2 3×3
  ``strided_conv`` (no norm, no activation); the skip is the residual block's output;
* ``bottleneck``: two 3×3 conv – InstanceNorm – ReLU at twice the deepest width;
* attention fusion at the three skip levels and at the bottleneck: global average pooling per
  contrast → shared ``mlp`` (Linear – ReLU – Linear, hidden ``max(C // 16, 4)``) → softmax
  across contrasts → weighted sum. No modality embedding: any non-empty set of contrasts, in
  any order, gives the same prediction for the same set;
* decoder: ``upconv`` (2×2 transposed conv, stride 2), concatenation with the fused skip, two
  3×3 conv – InstanceNorm – ReLU (``conv``);
* ``output_layer``: 1×1 conv to 3 channels and a sigmoid, scaled to PD [0, 1] a.u.,
  T1 [0, 5] s, T2 [0, 3] s (output channel order PD, T1, T2).

All norms are ``InstanceNorm2d(affine=True, track_running_stats=False)`` and are named
``bn*``, as in the published state_dict, so that published weights load with ``strict=True``.
At width 64 the network has 8,562,559 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OUTPUT_RANGES", "SharedAttnUNet", "count_parameters", "kaiming_init"]

OUTPUT_RANGES = {"PD": 1.0, "T1": 5.0, "T2": 3.0}
"""Upper ends of the sigmoid-scaled outputs (PD a.u., T1 and T2 in seconds), channel order."""


def _norm(c: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(c, affine=True, track_running_stats=False)


class ResidualBlock(nn.Module):
    """conv3×3–IN–ReLU–conv3×3–IN plus a 1×1 projection of the input, summed, ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = _norm(c_out)
        self.residual_connection = nn.Conv2d(c_in, c_out, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.residual_connection(x))


class EncoderBlock(nn.Module):
    """Residual block (its output is the skip) then a stride-2 3×3 convolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.residual_block = ResidualBlock(c_in, c_out)
        self.strided_conv = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.residual_block(x)
        return self.strided_conv(skip), skip


class AttentionFusion(nn.Module):
    """Squeeze-and-excitation style fusion across contrasts (softmax over the contrast axis)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 16, 4)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, channels))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats``: (B, N, C, H, W) → fused (B, C, H, W)."""
        logits = self.mlp(feats.mean(dim=(3, 4)))  # (B, N, C)
        weights = torch.softmax(logits.float(), dim=1).to(feats.dtype)
        return (feats * weights[..., None, None]).sum(dim=1)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), _norm(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), _norm(c_out), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """2×2 transposed conv (stride 2), concatenation with the skip, two conv–IN–ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.upconv = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv = _double_conv(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.upconv(x), skip], dim=1))


class SharedAttnUNet(nn.Module):
    """Multi-contrast U-Net of seed 000 (see the module docstring).

    ``width``: channels of the first level (64 in the seed; 128, 256 and 512 follow).
    ``forward(x, mask=None)``: ``x`` of shape (B, N, H, W) holds N ≥ 1 mode-normalised
    contrasts (any subset of T1w/T2w/FLAIR, any order); H and W must be multiples of 8.
    Returns (B, 3, H, W): PD (a.u.), T1 (s), T2 (s), multiplied by ``mask`` (B, 1, H, W) if
    given.
    """

    LEVELS = 3

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = int(width)
        self.channels_last = False  # set with `use_channels_last()` (CUDA)
        chans = [self.width * 2**i for i in range(self.LEVELS)]  # 64, 128, 256
        self.enc_blocks = nn.ModuleList(
            EncoderBlock(c_in, c_out) for c_in, c_out in zip([1, *chans[:-1]], chans, strict=True)
        )
        deep = chans[-1] * 2  # 512
        self.bottleneck = _double_conv(chans[-1], deep)
        self.skip_fusers = nn.ModuleList(AttentionFusion(c) for c in chans)
        self.bottleneck_fuser = AttentionFusion(deep)
        dec = [deep, *chans[::-1]]  # 512, 256, 128, 64
        self.dec_blocks = nn.ModuleList(
            DecoderBlock(dec[i], dec[i + 1]) for i in range(self.LEVELS)
        )
        self.output_layer = nn.Sequential(nn.Conv2d(chans[0], 3, 1), nn.Sigmoid())
        self.register_buffer("output_scale", torch.tensor(list(OUTPUT_RANGES.values())),
                             persistent=False)

    def use_channels_last(self, enabled: bool = True) -> SharedAttnUNet:
        """Store weights and run convolutions in channels-last layout (faster on CUDA)."""
        self.channels_last = bool(enabled)
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] < 1:
            raise ValueError(f"expected input (B, N>=1, H, W), got shape {tuple(x.shape)}")
        b, n, h, w = x.shape
        if h % 8 or w % 8:
            raise ValueError(f"height and width must be multiples of 8, got {h}x{w}")
        y = x.reshape(b * n, 1, h, w)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        fused_skips = []
        for block, fuser in zip(self.enc_blocks, self.skip_fusers, strict=True):
            y, skip = block(y)
            fused_skips.append(fuser(skip.reshape(b, n, *skip.shape[1:])))
        y = self.bottleneck(y)
        y = self.bottleneck_fuser(y.reshape(b, n, *y.shape[1:]))
        for block, skip in zip(self.dec_blocks, reversed(fused_skips), strict=True):
            y = block(y, skip)
        out = self.output_layer(y).float() * self.output_scale.view(1, 3, 1, 1)
        if mask is not None:
            out = out * mask.to(out.dtype)
        return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kaiming_init(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Kaiming-normal (fan-in, ReLU) weights and zero biases for every conv and linear layer;
    InstanceNorm affine parameters stay at 1 and 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
