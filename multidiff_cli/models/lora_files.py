"""LoRA files: reading their tensors (safetensors; pickles only when asked), and adapter sets."""
from __future__ import annotations

from pathlib import Path

import torch

from ..catalog import PICKLE_SUFFIXES
from ..errors import LoraError
from .conditioning import AdapterSet


def adapter_set(loras: list[tuple[str, float]]) -> AdapterSet:
    """LoRA (file, scale) pairs as one set: a file given twice adds its scales; order does not matter."""
    scales: dict[str, float] = {}
    for path, scale in loras:
        scales[path] = scales.get(path, 0.0) + scale
    return tuple(sorted(scales.items()))


def read_lora_file(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors: safetensors, or a pickle (catalog.PICKLE_SUFFIXES) only with allow_pickle."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise LoraError(f"LoRA {path}: {suffix} files are pickles, which can run code when loaded; use a "
                        ".safetensors LoRA, or, for a file you trust, pass --allow-pickle")
    try:
        if suffix in PICKLE_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        else:
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
    except Exception as exc:  # truncated, not safetensors, not a tensor dict
        raise LoraError(f"LoRA {path}: cannot read it as a {suffix or 'weights'} file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoraError(f"LoRA {path}: holds no LoRA weights (not a dict of tensors)")
    return state
