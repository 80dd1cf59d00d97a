"""What a render needs from a model (Components), on which device and in which dtype."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UsageError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = f"{', '.join(list(DTYPES)[:-1])} or {list(DTYPES)[-1]}"
DEVICE_CHOICES = "cpu, cuda, cuda:N or mps"
OFF_WORDS = ("0", "false", "no", "off")  # what a MULTIDIFF_* switch in the environment reads as off


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
    few_step_model: bool = False  # distilled to sample in a few steps (SD-Turbo, LCM, ...): loading.is_few_step_model
    lora_state: Any = None  # the LoRAs loaded into the UNet and text encoder (models.lora)
    family: str = "sd"  # "sd" (SD 1.x/2.x: models/sd.py) or "sdxl" (SDXL, SDXL-Turbo: models/sdxl.py)
    tokenizer_2: Any = None  # SDXL's second tokenizer and text encoder (OpenCLIP bigG, with projection)
    text_encoder_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is zeros (model_index.json)
    vae_id: str | None = None  # the scene's `vae:`, where it replaced the model's own VAE

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


def pick_device(name: str | None = None, source: str = "--device") -> torch.device:
    """`name` if given, else CUDA, else Apple MPS, else CPU.

    source: where `name` came from ("--device", "$MULTIDIFF_DEVICE"), for the error message."""
    if not name:
        return _present_devices()[0]
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows: too long for one line
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{source}: {name!r} is not a device; choose {DEVICE_CHOICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{source}: {name!r} asked for CUDA, but torch sees no CUDA device here; {_choose()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"{source}: {name!r} asked for CUDA device {device.index}, but torch sees {count} "
                         f"(cuda:0 to cuda:{count - 1}); {_choose()}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{source}: {name!r} asked for Apple MPS, but it is not available here; {_choose()}")
    return device


def _present_devices() -> list[torch.device]:
    """The devices torch can render on here, the best first."""
    present = [torch.device("cuda")] if torch.cuda.is_available() else []
    present += [torch.device("mps")] if torch.backends.mps.is_available() else []
    return present + [torch.device("cpu")]


def _choose() -> str:
    names = [str(device) for device in _present_devices()]
    if torch.cuda.device_count() > 1:
        names[0] = f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
    return f"choose {' or '.join(reversed(names))} (or leave it unset for the best present)"


def pick_dtype(device: torch.device, name: str | None = None, source: str = "--dtype") -> torch.dtype:
    """`name` if given, else float16 on CUDA and float32 elsewhere.

    source: where `name` came from, for the error message."""
    if name:
        if name not in DTYPES:
            raise UsageError(f"{source}: {name!r} is not a dtype; choose {DTYPE_CHOICES}")
        return DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


def speed_up(components: Components, compile: bool = False) -> Components:
    """Channels-last convolutions where they measured faster; optionally torch.compile the UNet.

    - the UNet on CUDA (tensor cores); on the CPU it gained nothing (7.04 against 7.19 s a call of
      2 samples of 64x64 latents, SD2, 2 cores, and slower under load);
    - the VAE on the CPU: oneDNN runs its full-resolution convolutions faster channels-last (a
      1024x512 decode: 14.9 s against 18.4 s, SD2's VAE, float32, 2 cores). Its results differ from
      the default layout's by float rounding: decoded pixels by 2e-4 of the [-1, 1] range (under one
      8-bit level), and what it encodes (bootstrap backgrounds, init images) likewise, so a CPU
      render's latents differ from those of a model set up without it by rounding too.

    On the CPU it also keeps freed tensor memory for reuse (`keep_freed_memory`).

    Attention already runs through PyTorch's scaled-dot-product attention (diffusers' default
    processor on torch 2). Compilation costs a minute or so on the first call and pays off over
    long batches.
    """
    if components.device.type == "cuda":
        components.unet.to(memory_format=torch.channels_last)
    if components.device.type == "cpu":
        components.vae.to(memory_format=torch.channels_last)
        keep_freed_memory()
    if compile:
        components.unet = torch.compile(components.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return components


def to_device(components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    """Move to `device`: text encoders and UNet in `dtype`; the VAE stays float32 (fp16 decodes overflow),
    except a VAE the scene's `vae:` names whose config says `force_upcast: false` (diffusers' mark of a
    VAE safe in float16, such as madebyollin/sdxl-vae-fp16-fix)."""
    vae_dtype = torch.float32
    if components.vae_id is not None and getattr(components.vae.config, "force_upcast", True) is False:
        vae_dtype = dtype
    for module, module_dtype in (
        (components.text_encoder, dtype),
        (components.text_encoder_2, dtype),
        (components.unet, dtype),
        (components.vae, vae_dtype),
    ):
        if module is None:  # the bench runs without a text encoder
            continue
        module.to(device=device, dtype=module_dtype).eval().requires_grad_(False)
    components.device, components.dtype = device, dtype
    return components


def quiet_libraries() -> None:
    """Silence diffusers/transformers chatter (config-key notices, progress bars) unless debugging."""
    if os.environ.get("MULTIDIFF_DEBUG", "").strip().lower() not in ("", *OFF_WORDS):
        return
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: glibc never trims the heap by itself (mallopt(3))
USER_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory PyTorch frees on the CPU for its next tensors.

    By default glibc serves large blocks (over a threshold that starts at 128 KiB and adapts up to 32
    MiB: most of a UNet's activations at 512 px) with fresh mappings from the kernel, unmaps them when
    freed and trims the heap as it empties, so every UNet call faults its activations in again, page
    by page, zeroed by the kernel (README, *Freed memory on the CPU*: 13% of a panorama's UNet time,
    SD2, 2 cores). What it frees stays with the process until `release_freed_memory`. Off with
    MULTIDIFF_KEEP_FREED_MEMORY=0; left alone where the user set the same settings (MALLOC_MMAP_MAX_,
    MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or their GLIBC_TUNABLES) or
    preloads another allocator, and off glibc. Returns whether it applied."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen = (
        os.environ.get("MULTIDIFF_KEEP_FREED_MEMORY", "1").strip().lower() in OFF_WORDS
        or any(name in os.environ for name in USER_MALLOC_VARIABLES)
        or any(f"glibc.malloc.{name}" in tunables for name in ("mmap_max", "mmap_threshold", "trim_threshold", "top_pad"))
        or "malloc" in os.environ.get("LD_PRELOAD", "")
    )
    libc = None if chosen else _glibc()
    return libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1


def release_freed_memory() -> None:
    """Give the memory `keep_freed_memory` kept back to the system (glibc's malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (Linux), with mallopt and malloc_trim; else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the render's tensors live; None where it cannot be told (MPS). On the CPU,
    memory this process freed and kept for reuse (`keep_freed_memory`) is given back first, so a
    render after another is not told its predecessor's leftovers are taken."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        release_freed_memory()
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
