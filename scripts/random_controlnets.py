"""Random ControlNets for a scene, so its ControlNet example renders offline on a built-in random model.

    .venv/bin/python scripts/random_controlnets.py scenes/control/knight_in_hall.yaml
    .venv/bin/multidiff render scenes/control/knight_in_hall.yaml --model tiny-random --steps 4

Writes every ControlNet folder the scene names that does not exist yet (never one that does; hub ids and
`random-controlnet` are left alone): a diffusers ControlNet with random weights shaped for --model's
UNet (default tiny-random; tiny-sdxl-random for an SDXL-shaped scene). The picture is as noise-like as
tiny-random's own; the point is to try the whole path (loading, per-region residuals, the record)
without a hub."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multidiff_cli.catalog import BUILT_IN, RANDOM_CONTROLNET, looks_like_hub_id
from multidiff_cli.models.control import build_random_controlnet
from multidiff_cli.models.random_weights import build_random
from multidiff_cli.scene.paths import scene_path
from multidiff_cli.scene.yamlpos import parse_yaml


def controlnet_names(scene: dict) -> list[str]:
    """Every ControlNet a scene (as parsed YAML) names, the scene's and its regions', in order."""
    owners = [scene] + [r for r in scene.get("regions") or [] if isinstance(r, dict)]
    names = [c.get("model") for owner in owners for c in owner.get("control") or [] if isinstance(c, dict)]
    return list(dict.fromkeys(name for name in names if isinstance(name, str)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scene", type=Path)
    parser.add_argument("--model", default="tiny-random", choices=sorted(name for name, family in BUILT_IN.items()
                                                                           if family in ("sd", "sdxl")))
    args = parser.parse_args(argv)
    data, _ = parse_yaml(args.scene)
    unet = build_random(args.model).denoiser
    for k, name in enumerate(controlnet_names(data)):
        path = scene_path(args.scene.resolve().parent, name)
        if name == RANDOM_CONTROLNET or path.exists() or looks_like_hub_id(name):
            print(f"kept {name} ({'it exists' if path.exists() else 'not a local folder'})", file=sys.stderr)
            continue
        build_random_controlnet(unet, seed=k).save_pretrained(path, safe_serialization=True)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
