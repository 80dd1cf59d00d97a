"""The starter scene `multidiff init` writes: every key, with its default, explained."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError


STARTER_SCENE = """\
# A multidiff scene. Render it:  multidiff render scene.yaml
# Look at the layout first (no model needed):  multidiff preview scene.yaml
# Every key but `prompt` is optional; the values below are the defaults.

prompt: a cozy living room, warm evening light      # the whole picture; fills what no region covers
negative_prompt: ""            # steered away from, for every prompt without its own
style: ""                      # appended to every prompt, e.g. "oil painting, warm light"
width: 512                     # pixels, a multiple of 8; beyond the model's size -> a panorama
height: 512
steps: 50
# bootstrap_steps: 10          # absent: steps / 5, rounded; 0 turns bootstrapping off
# guidance_scale: 7.5          # absent: the model family's (SD, SDXL: 7.5); <= 1 turns guidance off (SD-Turbo)
# seed: 42                     # absent: a random seed, recorded in the PNG
# scheduler: ddim              # absent: the family's (SD, SDXL: ddim); ddim, ddpm, pndm, lms, euler, euler-a, heun, dpm++, dpm++-karras, unipc
# model: stabilityai/stable-diffusion-2-base   # hub id, diffusers folder or .safetensors file (relative to this file), or tiny-random
# model_config: stabilityai/stable-diffusion-2-1   # a .safetensors model's configs (folder or hub id)
# vae: madebyollin/sdxl-vae-fp16-fix  # a diffusers VAE (hub id or folder) instead of the model's own
view_stride: 64                # pixels between panorama views
wrap: none                     # horizontal: a 360-degree panorama
tiled_decode: auto             # auto: tiles above 1024x1024 pixels
few_step: auto                 # quantized masks + mask-centering; auto: on for turbo/LCM/lightning models
# max_batch: auto              # UNet samples per call; auto: the size this device runs fastest
# init_image: photo.jpg        # a picture to start from, relative to this file; canvas: its size
# strength: 0.8                # with init_image: how far to re-noise it (1: from pure noise)
# keep: none                   # with init_image: outside_regions (repaint the regions only) or a mask (white = may change)
# loras:                       # LoRAs on every prompt (.safetensors, relative to this file)
#   - path: loras/film_look.safetensors
#     scale: 0.6               # default 1.0
# control:                     # ControlNets on every prompt (README, ControlNet; SD, SDXL, FLUX.1)
#   - model: lllyasviel/control_v11f1p_sd15_depth   # hub id, diffusers folder (relative to this file), random-controlnet
#     image: depth.png         # relative to this file; resized to the canvas
#     scale: 1.0               # conditioning scale
#     start: 0.0               # share of the steps before it starts
#     end: 1.0                 # share of the steps after which it stops
# reference:                   # IP-Adapter pictures on every prompt (README, IP-Adapter; SD, SDXL)
#   - {model: h94/IP-Adapter, weight: models/ip-adapter_sd15.safetensors, image: style.jpg, scale: 1.0}
# region_windows: false        # true: each region's prompt runs on a window around it; auto: where that saves samples
# window_context: 0.25         # a window's margin around its region, as a share of the region's side
# window_unconditional: own    # canvas: windows guide with the canvas's negative sample (faster, less exact)

regions:                       # each prompt owns a box or a mask; none: plain text-to-image
  - prompt: a red velvet sofa
    box: [128, 272, 384, 448]  # x0, y0, x1, y1 in pixels, origin top-left
  # - prompt: a framed painting
  #   mask: masks/painting.png # relative to this file; white = region, any size
  #   negative_prompt: text    # this region's own (default: the scene's)
  #   guidance_scale: 9.0      # this region's own (default: the scene's)
  #   loras: [{path: loras/alice.safetensors, scale: 0.9}]   # on this region's samples only
  #   control: [{model: lllyasviel/control_v11p_sd15_openpose, image: pose.png}]   # its samples only; fitted to its box
  #   reference: [{model: h94/IP-Adapter, weight: models/ip-adapter_sd15.safetensors, image: face.jpg}]
  #   window: auto             # where its prompt runs: canvas, auto, or [x0, y0, x1, y1]
"""


def write_starter(path: Path, force: bool = False) -> Path:
    """Write STARTER_SCENE to `path`; an existing file only with `force`."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory: name the scene file to write, e.g. {path / 'scene.yaml'}")
    if path.exists() and not force:
        raise UsageError(f"{path} exists: pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STARTER_SCENE.replace("scene.yaml", str(path), 2), encoding="utf-8")
    return path
