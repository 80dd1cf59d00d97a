"""Random LoRA files for a scene, so its LoRA example renders offline on a built-in random model.

    .venv/bin/python scripts/random_loras.py scenes/lora/two_characters.yaml
    .venv/bin/multidiff render scenes/lora/two_characters.yaml --model tiny-random --steps 4

Writes every LoRA file the scene names that does not exist yet (never one that does), with random
weights shaped for --model (default tiny-random; tiny-sdxl-random for an SDXL-shaped scene): every
attention projection of its denoiser, rank 16, in diffusers' peft layout. The picture is as
noise-like as tiny-random's own; the point is to try the whole LoRA path (loading, per-region
switching, the record) without a hub."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from multidiff_cli.catalog import BUILT_IN
from multidiff_cli.models.random_weights import build_random, random_lora
from multidiff_cli.scene.paths import scene_path
from multidiff_cli.scene.yamlpos import parse_yaml


def lora_names(scene: dict) -> list[str]:
    """Every LoRA path a scene (as parsed YAML) names, the scene's and its regions', in order."""
    owners = [scene] + [r for r in scene.get("regions") or [] if isinstance(r, dict)]
    names = []
    for owner in owners:
        for lora in owner.get("loras") or []:
            name = lora.get("path") if isinstance(lora, dict) else lora
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scene", type=Path)
    parser.add_argument("--model", default="tiny-random", choices=sorted(BUILT_IN))
    args = parser.parse_args(argv)
    data, _ = parse_yaml(args.scene)
    model = build_random(args.model)
    for k, name in enumerate(lora_names(data)):
        path = scene_path(args.scene.resolve().parent, name)
        if path.exists():
            print(f"kept {path} (it exists)", file=sys.stderr)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(random_lora(model, torch.Generator().manual_seed(k)), str(path))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
