"""ControlNets (Zhang et al. 2023) on the samples of the prompts that ask for them: loaded once per model,
their control images carried by the sampler as canvas-aligned *guides*, their residuals added to those
samples' UNet calls only.

The sampler never hears of ControlNets. Each condition (a text with its LoRA set and its control set)
is one row of the Conditioning, which carries a 0/1 row of the controls it runs with ("control",
(E, K)); the sampler crops the control images with every input ("guides", one row per sample: each
picture as its family's ControlNet reads it, on the latent grid — SD's pixels unshuffled 8x8 per cell,
FLUX's VAE latents — so a view's crop of them is a crop of whole cells). A family's forward runs each
control's ControlNet on the rows that use it and adds its residuals to theirs, as diffusers'
multi-ControlNet pipelines sum them, so a region's control acts on its samples alone, by construction.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..catalog import PICKLE_SUFFIXES, RANDOM_CONTROLNET, control_model_file, control_weights_file, looks_like_hub_id
from ..errors import ControlError, ModelError, ModelNotFound
from .conditioning import Conditioning

if TYPE_CHECKING:
    from .family import Model

CONTROL_CHANNELS = 3  # a control image is RGB, in [0, 1] (diffusers' control_image_processor: no normalising)


@dataclass(frozen=True)
class Control:
    """One control of a render: its ControlNet, its conditioning scale, and the timesteps it is on at."""

    net: Any  # diffusers' ControlNetModel (SD, SDXL) or FluxControlNetModel
    scale: float
    on_at: frozenset[float]  # float(t) of every evaluation it runs at (`kept_timesteps`)
    label: str = ""
    channels: tuple[int, int] = (0, 0)  # its channels of the guides, start and end (`assemble`)

    def runs_at(self, t: torch.Tensor) -> bool:
        return float(t) in self.on_at


def kept_timesteps(timesteps: torch.Tensor, start: float, end: float) -> frozenset[float]:
    """The timesteps of a render's evaluations (the schedule's, from the first one run) at which a control
    with `start` and `end` (fractions of them) is on: diffusers' controlnet_keep, evaluation i of n kept
    unless i/n < start or (i+1)/n > end. A timestep a Heun-type solver evaluates twice is on if either is."""
    n = len(timesteps)
    return frozenset(float(t) for i, t in enumerate(timesteps) if not (i / n < start or (i + 1) / n > end))


# --- loading ------------------------------------------------------------------------------------


def build_random_controlnet(unet, seed: int = 0):
    """A ControlNet shaped for `unet`, with random weights (built in code: `model: random-controlnet`).

    diffusers' `ControlNetModel.from_unet` copies the UNet's encoder (how ControlNets are trained from),
    and zeroes the convolutions that carry the residuals out, so a new ControlNet changes nothing;
    here those get random weights too (PyTorch's default initialisation, seeded), so its residuals
    are not zero and tests can tell where they went."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)
        for conv in [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.reset_parameters()
    return net.eval()


def load_controlnet(name: str, model: Model, allow_pickle: bool = False):
    """ControlNet `name` for `model`: the built-in random one, a diffusers folder, a single file
    (.safetensors; A1111's layout, read by diffusers' from_single_file) or a hub id (diffusers' cache, or a
    download). Its weights from safetensors unless allow_pickle; no remote code."""
    import diffusers

    if name == RANDOM_CONTROLNET:
        return model.random_controlnet()
    ControlNetModel = getattr(diffusers, model.controlnet_class)
    path = Path(name)
    try:
        if path.is_dir():
            weights = control_weights_file(path)
            if weights is None:
                raise ControlError([f"ControlNet {name}: a diffusers ControlNet folder holds config.json and "
                                    "diffusion_pytorch_model.safetensors"])
            kind = _class_name(path)
            if kind and kind != model.controlnet_class:
                raise ControlError([f"ControlNet {name}: not a ControlNet for this model ({model.model_id}): a {kind}, "
                                    f"and {model.facts.label} models take a {model.controlnet_class}"])
            if weights.suffix == ".bin" and not allow_pickle:
                raise ControlError([f"ControlNet {name} has pickle weights only ({weights.name}), which can run "
                                    "code when loaded: use safetensors, or, for a file you trust, pass --allow-pickle"])
            return ControlNetModel.from_pretrained(path, use_safetensors=weights.suffix != ".bin")
        if path.is_file():
            if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
                raise ControlError([f"ControlNet {name} is a pickle ({path.suffix}), which can run code when loaded: "
                                    "use a .safetensors file, or, for a file you trust, pass --allow-pickle"])
            return ControlNetModel.from_single_file(str(path))
        if looks_like_hub_id(name):
            return ControlNetModel.from_pretrained(name, use_safetensors=not allow_pickle)
    except (OSError, ValueError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if path.is_file():
            raise ModelError(f"ControlNet {name}: cannot read it as a single-file ControlNet ({first[:200]}); diffusers "
                             "takes a single file's config from the hub: offline, use a diffusers folder") from None
        raise ModelNotFound(f"ControlNet {name}: no folder of that name beside the scene file, and as a hub id not in "
                            f"the local Hugging Face cache nor downloadable ({first[:160]}). Download it where the hub is "
                            f"reachable (hf download {name}) and copy the cache (HF_HOME), or point `model:` at a local "
                            "diffusers ControlNet folder") from None
    raise ControlError([f"ControlNet {name}: no such folder or file, and not a hub id (owner/name)"])


def _class_name(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def loaded_controlnets(model: Model, names: list[str], allow_pickle: bool = False) -> dict[str, Any]:
    """Each ControlNet `names` holds (resolved names), loaded once per model (a file edited since, anew), on
    the model's device and dtype. ControlError with one line per ControlNet that cannot drive the model."""
    cache, problems, out = model.state.controlnets, [], {}
    for name in dict.fromkeys(names):
        file = control_model_file(name)
        stat = None if file is None else file.stat()
        stamp = None if stat is None else (stat.st_size, stat.st_mtime_ns)
        key = f"{name}@{model.model_id}" if name == RANDOM_CONTROLNET else name
        if key not in cache or cache[key][0] != stamp:
            cache[key] = (stamp, load_controlnet(name, model, allow_pickle))
        net = cache[key][1]
        mismatch = model.control_mismatch(net)
        if mismatch:
            problems.append(f"ControlNet {name}: not a ControlNet for this model ({model.model_id}): {mismatch}")
            continue
        if net.device != model.device or net.dtype != model.dtype:
            with diffusers_quiet():  # diffusers: "modules that should be kept in float32: []" on every dtype move
                net.to(device=model.device, dtype=model.dtype)
        out[name] = net.eval().requires_grad_(False)
    if problems:
        raise ControlError(problems)
    return out


@contextlib.contextmanager
def diffusers_quiet():
    """diffusers' warnings off for a while (what it logs on loading and moving models the errors say better)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.ERROR)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def control_mismatch(net, unet) -> str | None:
    """Why ControlNet `net` cannot drive `unet` (another family or size), or None."""
    theirs, ours = net.config, unet.config
    xl = lambda config: getattr(config, "addition_embed_type", None) == "text_time"  # noqa: E731
    if xl(theirs) != xl(ours):
        kind = "an SDXL ControlNet" if xl(theirs) else "an SD 1.x/2.x ControlNet"
        return f"{kind}, and this model is {'SDXL' if xl(ours) else 'SD 1.x/2.x'}"
    if theirs.cross_attention_dim != ours.cross_attention_dim:
        width = {768: " (SD 1.x)", 1024: " (SD 2.x)", 2048: " (SDXL)"}
        return (f"made for {theirs.cross_attention_dim}-wide cross attention{width.get(theirs.cross_attention_dim, '')}, "
                f"and this model's is {ours.cross_attention_dim}-wide{width.get(ours.cross_attention_dim, '')}")
    if tuple(theirs.block_out_channels) != tuple(ours.block_out_channels):
        return (f"its blocks are {list(theirs.block_out_channels)} wide, this model's UNet's "
                f"{list(ours.block_out_channels)}")
    return None


# --- images and residuals ---------------------------------------------------------------------


def assemble(model: Model, specs: list[tuple[Any, float, frozenset[float], str]],
             pictures: list[torch.Tensor]) -> tuple[tuple[Control, ...], torch.Tensor]:
    """A render's controls and the sampler's guides: each (net, scale, on_at, label) with its canvas-sized picture
    (3, H, W) in [0, 1] as its family reads it (`Model.control_guide`: SD's pixels unshuffled to the latent
    grid, FLUX's VAE latents), the guides of all of them stacked by channel, each control knowing its own."""
    controls, parts, start = [], [], 0
    for (net, scale, on_at, label), picture in zip(specs, pictures):
        guide = model.control_guide(net, picture[None].to(model.device))
        controls.append(Control(net, scale, on_at, label, (start, start + guide.shape[1])))
        parts.append(guide.float())
        start += guide.shape[1]
    return tuple(controls), torch.cat(parts, dim=1)


def control_residuals(controls: tuple[Control, ...], inputs: torch.Tensor, t: torch.Tensor,
                      conditioning: Conditioning, unet_kwargs: dict[str, Any], cell_px: int) -> dict[str, Any]:
    """The UNet's extra residuals for a batch: each control on at t runs its ControlNet on the rows that use it
    (their inputs, text conditioning and guide crops), and its residuals, scaled, are summed into theirs; rows
    without a control get zeros (adding them changes nothing). {} where no control runs."""
    if not controls or "control" not in conditioning.tensors:
        return {}
    uses, guides = conditioning.get("control"), conditioning.get("guides")
    down = mid = None
    for k, control in enumerate(controls):
        rows = uses[:, k].nonzero().flatten()
        if rows.numel() == 0 or not control.runs_at(t):
            continue
        image = torch.nn.functional.pixel_shuffle(guides[rows, slice(*control.channels)], cell_px)
        kwargs = {name: _rows(value, rows) for name, value in unet_kwargs.items()}
        d, m = control.net(inputs[rows], t, controlnet_cond=image.to(control.net.dtype),
                           conditioning_scale=control.scale, return_dict=False, **kwargs)
        if down is None:
            down = [r.new_zeros((inputs.shape[0], *r.shape[1:])) for r in d]
            mid = m.new_zeros((inputs.shape[0], *m.shape[1:]))
        for total, r in zip(down, d):
            total[rows] += r
        mid[rows] += m
    if down is None:
        return {}
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _rows(value: Any, rows: torch.Tensor) -> Any:
    if isinstance(value, dict):
        return {name: _rows(v, rows) for name, v in value.items()}
    return value[rows.to(value.device)] if isinstance(value, torch.Tensor) else value


def set_rows(sets: list[tuple[int, ...]], count: int) -> torch.Tensor:
    """(E, count) 0/1: which of `count` controls (or references) each condition runs with."""
    table = torch.zeros((len(sets), count))
    for row, ks in enumerate(sets):
        table[row, list(ks)] = 1.0
    return table


class GroupedRun:
    """Runs a batch's rows in the order of their control and reference sets (stable), and returns the outputs
    in the batch's order: the chunked calls below it then hold each set's rows together, so a ControlNet
    runs once on a region's conditional and unconditional samples, not once for each, and a call holds few
    reference groups. Rows without such sets pass through as they are."""

    KEYS = ("control", "reference")

    def __init__(self, run):
        self.run = run

    @property
    def samples_per_call(self) -> int:
        return self.run.samples_per_call

    def __call__(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        keys = [conditioning.get(name) for name in self.KEYS if name in conditioning.tensors]
        if not keys:
            return self.run(inputs, t, conditioning)
        rows = torch.cat(keys, dim=1).tolist()
        order = sorted(range(len(rows)), key=lambda i: rows[i])
        if order == list(range(len(rows))):
            return self.run(inputs, t, conditioning)
        index = torch.tensor(order)
        out = self.run(inputs[index.to(inputs.device)], t, conditioning[index])
        return out[torch.argsort(index).to(out.device)]
