"""Scheduler names -> diffusers schedulers built from the model's own config (catalog.DIFFUSION_SCHEDULERS,
catalog.FLOW_SCHEDULERS), wrapped as the noise schedule the sampler talks to (method/schedule.py)."""
from __future__ import annotations

import inspect
from typing import Any

from ..catalog import DIFFUSION_SCHEDULERS
from ..errors import ModelError

# Fusing predictions and stepping once equals the paper's per-prompt step only when a step is
# affine in the model output (README, *How it works*): sample clipping and dynamic thresholding are not.
_AFFINE = {"clip_sample": False, "thresholding": False}


def make_scheduler(name: str, model_config: dict[str, Any],
                   table: dict[str, tuple[str, dict[str, Any]]] = DIFFUSION_SCHEDULERS):
    """Build scheduler `name` of `table` (a family's: catalog.Family.schedulers) from the model's own
    scheduler config (betas, prediction type, spacing, shift)."""
    import diffusers

    class_name, overrides = table[name]
    if class_name == "LMSDiscreteScheduler":
        from diffusers.utils import is_scipy_available

        if not is_scipy_available():
            raise ModelError("scheduler 'lms' needs scipy: pip install scipy (or pick another scheduler)")
    cls = getattr(diffusers, class_name)
    config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    parameters = inspect.signature(cls.__init__).parameters
    if "flow_shift" in parameters and "shift" in config and "flow_shift" not in config:
        # a flow model's scheduler_config.json (FlowMatchEuler's) names its static shift `shift`; DPM-Solver++
        # and UniPC read `flow_shift` (default 1.0) and would otherwise run an unshifted schedule
        config["flow_shift"] = config.pop("shift")
    affine = {k: v for k, v in _AFFINE.items() if k in parameters}  # those it has
    return cls.from_config({**config, **overrides, **affine})
