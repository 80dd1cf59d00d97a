"""Where a render runs: the device and dtype, free memory, and quiet libraries."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from ..errors import UsageError
from .allocator import OFF_WORDS, release_freed_memory

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = f"{', '.join(list(DTYPES)[:-1])} or {list(DTYPES)[-1]}"
DEVICE_CHOICES = "cpu, cuda, cuda:N or mps"


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


def pick_dtype(device: torch.device, name: str | None = None, source: str = "--dtype",
               cuda_default: str = "float16") -> torch.dtype:
    """`name` if given, else the model family's CUDA dtype on CUDA (float16; FLUX: bfloat16, where
    float16 overflows) and float32 elsewhere.

    source: where `name` came from, for the error message."""
    if name:
        if name not in DTYPES:
            raise UsageError(f"{source}: {name!r} is not a dtype; choose {DTYPE_CHOICES}")
        return DTYPES[name]
    return DTYPES[cuda_default] if device.type == "cuda" else torch.float32


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
    # diffusers' own deprecations, on every FLUX ControlNet and every hub file it fetches: nothing a user can change
    warnings.filterwarnings("ignore", message=r".*`FluxPosEmbed` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*`local_dir_use_symlinks` argument is deprecated", category=UserWarning)


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
