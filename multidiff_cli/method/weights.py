"""Region masks -> per-prompt fusion weights at latent resolution (the W_i of the paper's Eq. 5)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def region_weights(region_masks: list[torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Stack W_0..W_N as (N+1, 1, h, w): W_0 = clamp(1 - sum of region masks, 0), the authors' semantics.

    Overlapping regions are not normalised here: the fusion divides by the sum of the weights,
    so where two regions overlap each counts once (they average).
    """
    regions = torch.stack([torch.as_tensor(m).float() for m in region_masks]) if region_masks else torch.zeros(0, *latent_hw)
    background = (1 - regions.sum(0)).clamp(min=0)
    return torch.cat([background[None], regions])[:, None]


def gaussian_blur(masks: torch.Tensor, std_cells: float) -> torch.Tensor:
    """Blur (N, 1, h, w) masks with a Gaussian of `std_cells` latent cells (replicate padding)."""
    if std_cells <= 0:
        return masks.float()
    radius = max(1, math.ceil(3 * std_cells))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * std_cells**2))
    kernel = kernel / kernel.sum()
    out = F.pad(masks.float(), (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, -1))
    return F.conv2d(out, kernel.reshape(1, 1, -1, 1))


def quantized_weights(region_masks: list[torch.Tensor], noise_levels: torch.Tensor, std_cells: float = 1.0) -> torch.Tensor:
    """Quantized masks (StreamMultiDiffusion, Lee et al. 2024): (steps, N+1, 1, h, w) weights, one set per step.

    Each region mask is blurred and scaled so its peak is 1; at a step whose noise level is
    `noise_levels[step]` (NoiseSchedule.noise_levels: sqrt(1 - alphas_cumprod[t]) for diffusion, σ for
    flow matching), the region is where the blurred mask exceeds it.
    Early (sigma near 1) only a mask's core counts, so a region cannot spill while the layout
    forms; as noise falls its edge grows out to the blurred outline, blending it with its
    surroundings. The background weight follows as 1 - sum, clamped at 0, at every step.
    """
    soft = gaussian_blur(torch.stack([torch.as_tensor(m).float() for m in region_masks])[:, None], std_cells)[:, 0]
    soft = soft / soft.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
    latent_hw = tuple(soft.shape[-2:])
    return torch.stack([region_weights(list((soft > level).float()), latent_hw) for level in noise_levels.tolist()])

