"""Models: one module per family (sd.py, sdxl.py) behind one protocol (family.Model), loaded from a hub id,
a folder, a single file or built in code. `run/` imports this package and nothing below it.

Names load when first used (PEP 562), so importing the package costs no torch: `validate` and
`preview` never load one."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Model": "family", "Conditioning": "conditioning", "AdapterSet": "conditioning",
    "load_model": "loading", "cached_models": "loading", "CachedModels": "loading", "weights_bytes": "loading",
    "available_bytes": "device",
    "pick_device": "device", "pick_dtype": "device", "quiet_libraries": "device",
    "adapter_set": "lora_files",
    "build_random": "random_weights",
    "Control": "control", "set_rows": "control", "kept_timesteps": "control", "loaded_controlnets": "control",
    "assemble": "control",
    "ReferenceSpec": "reference", "load_references": "reference", "image_embeddings": "reference",
    "reference_rows": "reference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
