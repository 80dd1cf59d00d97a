"""What multidiff knows of models without loading one (no torch): each family's facts and defaults, the
built-in random models, weight-file suffixes, and the one place a model's family is detected.

A family's behaviour (prompt encoding, its network call, codec, schedules) is its module,
models/<family>.py; the facts here are what validation, `models`, `validate` and `preview` need
before any weights are read (ComfyUI keeps them apart the same way: supported_models.py beside
model_base.py).
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Scheduler names a scene may use -> (diffusers class, config overrides), built from the model's own
# scheduler config (models/schedulers.py). The names follow what A1111/ComfyUI users type.
DIFFUSION_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
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
# Flow matching (method/schedule.py FlowSchedule): the flow schedulers diffusers has whose step is affine in
# the velocity. DPM-Solver++ and UniPC take flow sigmas and a flow prediction.
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                              "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
SCHEDULER_NAMES = tuple(dict.fromkeys([*DIFFUSION_SCHEDULERS, *FLOW_SCHEDULERS]))  # every family's, for the schema

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # weights that can run code when loaded: --allow-pickle only
SAFE_SUFFIXES = (".safetensors",)
CELL_PX = 8  # pixels per latent cell: every family's VAE downsamples by 8 (a family may say otherwise)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # a single-file model (A1111/ComfyUI layout)


@dataclass(frozen=True)
class Family:
    """A model family's facts: what it is called, its latent grid, schedulers and defaults, the
    diffusers folder it loads from, and where its behaviour lives."""

    name: str  # "sd": what PNG records, `models` and messages say
    label: str  # "SD 1.x/2.x", for people
    module: str  # models/<module>.py holds the family's class
    class_name: str
    pipelines: tuple[str, ...]  # diffusers pipeline classes in model_index.json that mean this family
    weights: dict[str, str]  # subfolder -> its weights file, a glob (sharded files: "model*.safetensors")
    folders: tuple[str, ...]  # other subfolders a render needs (tokenizers, scheduler)
    schedulers: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=lambda: DIFFUSION_SCHEDULERS)
    default_scheduler: str = "ddim"
    default_guidance: float = 7.5
    cell_px: int = CELL_PX  # pixels per latent cell (the VAE's downsampling)
    align_px: int = 8  # canvases and views are whole multiples of this (FLUX packs 2x2 cells: 16)
    default_steps: int = 50
    few_step_steps: int | None = None  # the default steps of the family's few-step models, where it has its own
    few_step_guidance: float | None = None  # the default guidance_scale of those models, where it is their own
    # What the sampler's scale s (uncond + s * (cond - uncond)) is for the scene's guidance_scale g: g + cfg_offset.
    # Z-Image's pipeline guides as cond + g * (cond - uncond): its g is s - 1, and a scene says Z-Image's g.
    cfg_offset: float = 0.0
    embedded_guidance: bool = False  # guidance_scale is an input of the network (FLUX.1-dev), not CFG
    cuda_dtype: str = "float16"  # the default dtype on CUDA (FLUX overflows in float16: bfloat16)
    lora_kinds: tuple[str, ...] = ()  # what a LoRA of this family names that others do not (for messages)
    native_px: int = 512  # its models' usual native window (a model's own is read from its config at render)
    window_align_px: int = 64  # region windows' sides are whole multiples: SD's UNet halves the latent 3 times
    controlnets: bool = False  # its models take ControlNets (`control:`, models/control.py)
    ip_adapters: bool = False  # its models take IP-Adapters (`reference:`, models/reference.py)

    @property
    def scheduler_names(self) -> tuple[str, ...]:
        return tuple(self.schedulers)


SD = Family(
    name="sd", label="SD 1.x/2.x", module="sd", class_name="SD",
    pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    weights={"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
             "vae": "diffusion_pytorch_model.safetensors"},
    folders=("tokenizer", "scheduler"), controlnets=True, ip_adapters=True,
)
SDXL = Family(
    name="sdxl", label="SDXL", module="sdxl", class_name="SDXL",
    pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    weights={**SD.weights, "text_encoder_2": "model.safetensors"},
    folders=("tokenizer", "tokenizer_2", "scheduler"), native_px=1024, controlnets=True, ip_adapters=True,
)
FLUX = Family(
    name="flux", label="FLUX.1", module="flux", class_name="Flux",
    pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    weights={"text_encoder": "model.safetensors", "text_encoder_2": "model*.safetensors",
             "transformer": "diffusion_pytorch_model*.safetensors", "vae": "diffusion_pytorch_model.safetensors"},
    folders=("tokenizer", "tokenizer_2", "scheduler"),
    schedulers=FLOW_SCHEDULERS, default_scheduler="euler", default_guidance=3.5, align_px=16,
    default_steps=28, few_step_steps=4, embedded_guidance=True, cuda_dtype="bfloat16",
    native_px=1024, window_align_px=16, controlnets=True,
)
SD3 = Family(
    name="sd3", label="SD3.5", module="sd3", class_name="SD3",
    pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    weights={"text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors",
             "text_encoder_3": "model*.safetensors", "transformer": "diffusion_pytorch_model*.safetensors",
             "vae": "diffusion_pytorch_model.safetensors"},
    folders=("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"),
    schedulers=FLOW_SCHEDULERS, default_scheduler="euler", default_guidance=7.0, align_px=16,
    default_steps=28, few_step_steps=4, cuda_dtype="bfloat16",
    native_px=1024, window_align_px=16,
)
ZIMAGE = Family(
    name="zimage", label="Z-Image", module="zimage", class_name="ZImage",
    pipelines=("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
    weights={"text_encoder": "model*.safetensors", "transformer": "diffusion_pytorch_model*.safetensors",
             "vae": "diffusion_pytorch_model.safetensors"},
    folders=("tokenizer", "scheduler"),
    schedulers=FLOW_SCHEDULERS, default_scheduler="euler", default_guidance=4.0, align_px=16,
    default_steps=50, few_step_steps=9, few_step_guidance=0.0, cfg_offset=1.0, cuda_dtype="bfloat16",
    native_px=1024, window_align_px=16,
)
FLUX2 = Family(
    name="flux2", label="FLUX.2 klein", module="flux2", class_name="Flux2Klein",
    pipelines=("Flux2KleinPipeline",),
    weights={"text_encoder": "model*.safetensors", "transformer": "diffusion_pytorch_model*.safetensors",
             "vae": "diffusion_pytorch_model.safetensors"},
    folders=("tokenizer", "scheduler"),
    # the canvas is klein's patchified latent space: one cell per 2x2 patch of the VAE's 8 px cells (models/flux2.py)
    schedulers=FLOW_SCHEDULERS, default_scheduler="euler", default_guidance=4.0, cell_px=16, align_px=16,
    default_steps=50, few_step_steps=4, few_step_guidance=1.0, cuda_dtype="bfloat16",
    native_px=1024, window_align_px=16,
)
FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SDXL, FLUX, SD3, ZIMAGE, FLUX2)}

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-base"
# A ControlNet with random weights shaped for the render's UNet, built in code (models/control.py): the
# example scene and the bench render with it offline.
RANDOM_CONTROLNET = "random-controlnet"
# Built-in models with random weights, built in code (models/random_weights.py): name -> family.
TINY_RANDOM, SD2_RANDOM = "tiny-random", "sd2-random"
TINY_SDXL_RANDOM, SDXL_RANDOM = "tiny-sdxl-random", "sdxl-random"
TINY_FLUX_RANDOM, TINY_FLUX_SCHNELL_RANDOM, FLUX_RANDOM = "tiny-flux-random", "tiny-flux-schnell-random", "flux-random"
TINY_SD3_RANDOM, SD3_RANDOM = "tiny-sd3-random", "sd3-random"
TINY_ZIMAGE_RANDOM, TINY_ZIMAGE_TURBO_RANDOM, ZIMAGE_RANDOM = "tiny-zimage-random", "tiny-zimage-turbo-random", "zimage-random"
TINY_KLEIN_RANDOM, TINY_KLEIN_BASE_RANDOM, KLEIN_RANDOM = "tiny-flux2-klein-random", "tiny-flux2-klein-base-random", "flux2-klein-random"
BUILT_IN: dict[str, str] = {TINY_RANDOM: "sd", SD2_RANDOM: "sd", TINY_SDXL_RANDOM: "sdxl", SDXL_RANDOM: "sdxl",
                            TINY_FLUX_RANDOM: "flux", TINY_FLUX_SCHNELL_RANDOM: "flux", FLUX_RANDOM: "flux",
                            TINY_SD3_RANDOM: "sd3", SD3_RANDOM: "sd3", TINY_ZIMAGE_RANDOM: "zimage",
                            TINY_ZIMAGE_TURBO_RANDOM: "zimage", ZIMAGE_RANDOM: "zimage", TINY_KLEIN_RANDOM: "flux2",
                            TINY_KLEIN_BASE_RANDOM: "flux2", KLEIN_RANDOM: "flux2"}
TINY_MODELS: dict[str, str] = {"sd": TINY_RANDOM, "sdxl": TINY_SDXL_RANDOM,  # each family's tiny model (smoke, tests)
                               "flux": TINY_FLUX_RANDOM, "sd3": TINY_SD3_RANDOM, "zimage": TINY_ZIMAGE_RANDOM,
                               "flux2": TINY_KLEIN_RANDOM}
FULL_SIZE_MODELS: dict[str, str] = {"sd": SD2_RANDOM, "sdxl": SDXL_RANDOM,  # each family's full-size one (gpu-check)
                                    "flux": FLUX_RANDOM, "sd3": SD3_RANDOM, "zimage": ZIMAGE_RANDOM,
                                    "flux2": KLEIN_RANDOM}
# flux-random: FLUX.1's width (24 heads of 128), text and pooled widths, with fewer of its (joint, single) blocks:
# the full depth (19, 38) does not fit a 24 GiB machine in float32. Every table that shows it says so.
FLUX_RANDOM_BLOCKS, FLUX_BLOCKS = (2, 4), (19, 38)
# zimage-random: Z-Image's width (30 heads of 128) and Qwen3-4B's text width, with ZIMAGE_RANDOM_LAYERS of its 30
# main layers (its two refiners of two each kept), for the same reason.
ZIMAGE_RANDOM_LAYERS, ZIMAGE_LAYERS = 4, 30
# flux2-klein-random: FLUX.2 klein 4B's width (24 heads of 128, Qwen3-4B's three 2560-wide layers) with fewer blocks.
KLEIN_RANDOM_BLOCKS, KLEIN_BLOCKS = (2, 4), (5, 20)
BUILT_IN_NOTES: dict[str, str] = {
    FLUX_RANDOM: f"FLUX.1's width, {FLUX_RANDOM_BLOCKS[0]} of {FLUX_BLOCKS[0]} joint and {FLUX_RANDOM_BLOCKS[1]} of "
                 f"{FLUX_BLOCKS[1]} single blocks",
    ZIMAGE_RANDOM: f"Z-Image's width, {ZIMAGE_RANDOM_LAYERS} of its {ZIMAGE_LAYERS} layers",
    KLEIN_RANDOM: f"FLUX.2 klein 4B's width, {KLEIN_RANDOM_BLOCKS[0]} of {KLEIN_BLOCKS[0]} double and "
                  f"{KLEIN_RANDOM_BLOCKS[1]} of {KLEIN_BLOCKS[1]} single blocks",
}


def model_label(model: str) -> str:
    """A model's name for tables, with what a built-in random model is not of the real one's."""
    return f"{model} ({BUILT_IN_NOTES[model]})" if model in BUILT_IN_NOTES else model
# Hub models whose family is known before they are downloaded (their model_index.json says the same).
HUB_FAMILIES: dict[str, str] = {
    DEFAULT_MODEL: "sd", "stabilityai/stable-diffusion-2-1-base": "sd", "stabilityai/stable-diffusion-2-1": "sd",
    "stabilityai/sd-turbo": "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl", "stabilityai/sdxl-turbo": "sdxl",
    "black-forest-labs/FLUX.1-dev": "flux", "black-forest-labs/FLUX.1-schnell": "flux",
    "stabilityai/stable-diffusion-3.5-medium": "sd3", "stabilityai/stable-diffusion-3.5-large": "sd3",
    "stabilityai/stable-diffusion-3.5-large-turbo": "sd3",
    "Tongyi-MAI/Z-Image-Turbo": "zimage", "Tongyi-MAI/Z-Image": "zimage",
    "black-forest-labs/FLUX.2-klein-4B": "flux2", "black-forest-labs/FLUX.2-klein-9B": "flux2",
    "black-forest-labs/FLUX.2-klein-base-4B": "flux2", "black-forest-labs/FLUX.2-klein-base-9B": "flux2",
}


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a path (no leading '.', '/' or '~')."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def is_single_file(model: str) -> bool:
    """A model given as a checkpoint file (not a folder, not a hub id)."""
    path = Path(model).expanduser()
    return path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file()


def control_weights_file(folder: Path) -> Path | None:
    """A diffusers ControlNet folder's weights file (safetensors first), or None."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def control_model_file(name: str) -> Path | None:
    """The local file whose sha256 a PNG records for a ControlNet `name` (resolved): a single file itself,
    a diffusers folder's weights; None for a hub id or the built-in random one."""
    path = Path(name)
    if name == RANDOM_CONTROLNET or not path.exists():
        return None
    return path if path.is_file() else control_weights_file(path)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; {} where there is none or it is not one (loading reports broken configs)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def family_of_folder(folder: Path) -> Family | None:
    """The family of a diffusers folder: its model_index.json's pipeline class; for a folder without one
    (written by an older multidiff, or by hand), its UNet's config (SDXL's adds a `text_time` embedding:
    pooled text and time ids) and its text encoders. None: no family multidiff knows."""
    index = read_json(folder / "model_index.json")
    pipeline = index.get("_class_name")
    for family in FAMILIES.values():
        if pipeline in family.pipelines:
            return family
    if (folder / "transformer" / "config.json").exists():
        transformer = read_json(folder / "transformer" / "config.json").get("_class_name")
        return {"FluxTransformer2DModel": FLUX, "SD3Transformer2DModel": SD3,
                "ZImageTransformer2DModel": ZIMAGE}.get(transformer)
    if pipeline is not None and not (folder / "unet").is_dir():
        return None
    if not (folder / "unet" / "config.json").exists():
        return None
    unet = read_json(folder / "unet" / "config.json")
    return SDXL if unet.get("addition_embed_type") == "text_time" and (folder / "text_encoder_2").is_dir() else SD


def safetensors_header(path: Path) -> dict | None:
    """A .safetensors file's header (tensor name -> dtype, shape, offsets; no weights read), or None when
    the file is no safetensors file (a text file given that name, a truncated download) or unreadable."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > 100_000_000:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return header if isinstance(header, dict) else None


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, from its header; [] if it has none."""
    header = safetensors_header(path) or {}
    return [key for key in header if key != "__metadata__"]


FLUX2_DEV_TEXT_WIDTH = 15360  # FLUX.2 [dev]'s text input (Mistral's hidden states); klein's are 7680 (4B), 12288 (9B)


def family_of_checkpoint(path: Path) -> Family | None:
    """The family of a single-file checkpoint by its keys: FLUX.2's transformer has `single_stream_modulation`
    (klein's; [dev]'s, told by its 15360-wide text input, is None: no family multidiff renders); FLUX.1's has
    `double_blocks` (BFL's layout, or ComfyUI's under `model.diffusion_model.`); SDXL's carry a second text
    encoder under `conditioner.embedders.1`; SD3's and Z-Image's by their transformers' first keys; a pickle
    (.ckpt) cannot be read without loading it: SD's, as diffusers would guess for the configs."""
    keys = checkpoint_keys(path) if path.suffix.lower() == ".safetensors" else []
    if {"single_stream_modulation.lin.weight", "model.diffusion_model.single_stream_modulation.lin.weight"} & set(keys):
        header = safetensors_header(path) or {}
        txt_in = header.get("txt_in.weight") or header.get("model.diffusion_model.txt_in.weight") or {}
        return FLUX2 if txt_in.get("shape", [0, 0])[-1] != FLUX2_DEV_TEXT_WIDTH else None
    if any(key.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for key in keys):
        return FLUX
    if any(key.startswith("model.diffusion_model.joint_blocks.") for key in keys):  # SD3's MMDiT
        return SD3
    if {"layers.0.adaLN_modulation.0.weight", "model.diffusion_model.layers.0.adaLN_modulation.0.weight"} & set(keys):
        return ZIMAGE  # Z-Image's single-stream transformer, by the key diffusers' single-file loading tells it by
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return SDXL
    return SD


def cached_folder(model: str) -> Path | None:
    """The snapshot folder of a hub id in the local Hugging Face cache, if its model_index.json is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


# Name fragments of few-step distilled models (loading.is_few_step_model), matched case-insensitively.
FEW_STEP_MARKERS = ("turbo", "lcm", "lightning", "hyper-sd", "schnell")
# FLUX.2 klein's distilled models are the ones not named "-base-" (FLUX.2-klein-4B, not FLUX.2-klein-base-4B).
FEW_STEP_PATTERN = re.compile("|".join([*map(re.escape, FEW_STEP_MARKERS), r"klein-(?!base)"]))


def is_few_step_model(model_id: str, folder: Path | None = None) -> bool:
    """Whether a model is distilled to sample in a few steps (SD-Turbo, SDXL-Turbo, LCM, SDXL-Lightning,
    Hyper-SD), where `few_step: auto` turns the few-step stabilisation on.

    Decided from names, since the weights do not say: the model's name (the id's last part), the
    folder's name (for a hub snapshot, its repo's), and the `_name_or_path` that model_index.json
    or the scheduler config may carry (a fine-tune saved from SD-Turbo keeps it), each searched for
    FEW_STEP_MARKERS (case-insensitive; a FLUX.2 klein not named "base"); or an LCMScheduler in the
    scheduler config, or `is_distilled` in model_index.json (Flux2KleinPipeline's mark).
    """
    names = [model_id.rstrip("/").rsplit("/", 1)[-1]]  # the name, not the owner or the folders above
    scheduler: dict = {}
    model_index: dict = {}
    if folder is not None:
        names.append(folder.name)
        if folder.parent.name == "snapshots":  # models--owner--name/snapshots/<commit>
            names.append(folder.parent.parent.name.rsplit("--", 1)[-1])
        model_index, scheduler = (read_json(folder / "model_index.json"),
                                  read_json(folder / "scheduler" / "scheduler_config.json"))
        names += [str(config.get("_name_or_path", "")) for config in (model_index, scheduler)]
    named = any(FEW_STEP_PATTERN.search(name.lower().replace("_", "-")) for name in names)
    return named or scheduler.get("_class_name") == "LCMScheduler" or model_index.get("is_distilled") is True


def detect_family(model: str) -> Family | None:
    """The family of `model` (a built-in name, a local folder or single file, or a hub id in the cache)
    without loading it; None when it cannot be told before downloading (or it is none multidiff knows)."""
    if model in BUILT_IN:
        return FAMILIES[BUILT_IN[model]]
    path = Path(model).expanduser()
    if path.is_dir():
        return family_of_folder(path)
    if is_single_file(model):
        return family_of_checkpoint(path)
    if looks_like_hub_id(model):
        folder = cached_folder(model)
        if folder is not None:
            return family_of_folder(folder)
        return FAMILIES[HUB_FAMILIES[model]] if model in HUB_FAMILIES else None
    return None


def detect_few_step(model: str) -> bool:
    """Whether `model` is a few-step distilled one, as far as its names tell before it is loaded."""
    path = Path(model).expanduser()
    folder = path if path.is_dir() else cached_folder(model) if looks_like_hub_id(model) else None
    return is_few_step_model(model, folder)
