"""What a render needs from a model (Components), on which device and in which dtype."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UsageError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Components:
    """Everything a render needs from a model, already on its device."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict[str, Any]
    model_id: str
    revision: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for every SD model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size_px(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given, else CUDA, else Apple MPS, else CPU."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise UsageError(f"--device: {name!r} is not a torch device ({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device: CUDA was asked for but torch sees no CUDA device")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError("--device: MPS was asked for but is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """`name` if given, else float16 on CUDA and float32 elsewhere."""
    if name:
        if name not in DTYPES:
            raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


def speed_up(components: Components, compile: bool = False) -> Components:
    """On CUDA, channels-last convolutions (faster with tensor cores); optionally torch.compile the UNet.

    Attention already runs through PyTorch's scaled-dot-product attention (diffusers' default
    processor on torch 2). Compilation costs a minute or so on the first call and pays off over
    long batches.
    """
    if components.device.type == "cuda":
        components.unet.to(memory_format=torch.channels_last)
    if compile:
        components.unet = torch.compile(components.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return components


def to_device(components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    """Move to `device`: text encoder and UNet in `dtype`; the VAE stays float32 (fp16 decodes overflow)."""
    for module, module_dtype in (
        (components.text_encoder, dtype),
        (components.unet, dtype),
        (components.vae, torch.float32),
    ):
        if module is None:  # the bench runs without a text encoder
            continue
        module.to(device=device, dtype=module_dtype).eval().requires_grad_(False)
    components.device, components.dtype = device, dtype
    return components


def quiet_libraries() -> None:
    """Silence diffusers/transformers chatter (config-key notices, progress bars) unless debugging."""
    if os.environ.get("MULTIDIFF_DEBUG"):
        return
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
