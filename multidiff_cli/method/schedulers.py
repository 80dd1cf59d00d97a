"""Scheduler names a scene may use -> diffusers scheduler classes, built from the model's own config."""
from __future__ import annotations

from typing import Any

from ..errors import ModelError

# name -> (diffusers class, config overrides). The names follow what A1111/ComfyUI users type.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)

# Fusing predictions and stepping once equals the paper's per-prompt step only when a step is
# affine in the model output (../METHOD.md): sample clipping and dynamic thresholding are not.
_AFFINE = {"clip_sample": False, "thresholding": False}


def make_scheduler(name: str, model_config: dict[str, Any]):
    """Build scheduler `name` from the model's own scheduler config (betas, prediction type, spacing)."""
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    if name == "lms":
        from diffusers.utils import is_scipy_available

        if not is_scipy_available():
            raise ModelError("scheduler 'lms' needs scipy: pip install scipy (or pick another scheduler)")
    config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    return getattr(diffusers, class_name).from_config({**config, **overrides, **_AFFINE})
