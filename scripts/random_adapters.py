"""Random ControlNets and IP-Adapters for a scene, so its example renders offline on a built-in random model.

    .venv/bin/python scripts/random_adapters.py scenes/control/knight_in_hall.yaml
    .venv/bin/multidiff render scenes/control/knight_in_hall.yaml --model tiny-random --steps 4

Writes every local ControlNet folder and IP-Adapter weight file the scene names that does not exist yet
(never one that does; hub ids and `random-controlnet` are left alone), with random weights shaped for
--model's denoiser (default tiny-random; tiny-sdxl-random for an SDXL-shaped scene, tiny-flux-random for FLUX.1
ControlNets): a diffusers ControlNet folder; an IP-Adapter weight file in h94/IP-Adapter's layout (a bare
weight name in its family's folder, models/ or sdxl_models/) with a small CLIP image encoder beside it.
The picture is as noise-like as tiny-random's own; the point is to try the whole path (loading,
per-region residuals and image attention, the record) without a hub."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multidiff_cli.catalog import BUILT_IN, FAMILIES, RANDOM_CONTROLNET, looks_like_hub_id
from multidiff_cli.models.device import quiet_libraries
from multidiff_cli.models.random_weights import build_random
from multidiff_cli.models.reference import save_random_ip_adapter
from multidiff_cli.scene.controls import H94_FOLDERS
from multidiff_cli.scene.paths import scene_path
from multidiff_cli.scene.yamlpos import parse_yaml


def named(scene: dict, key: str) -> list[dict]:
    """Every entry under `key` (control, reference) of a scene as parsed YAML, the scene's and its regions'."""
    owners = [scene] + [r for r in scene.get("regions") or [] if isinstance(r, dict)]
    return [item for owner in owners for item in owner.get(key) or [] if isinstance(item, dict)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scene", type=Path)
    parser.add_argument("--model", default="tiny-random", choices=sorted(name for name, family in BUILT_IN.items()
                                                                           if FAMILIES[family].controlnets))
    args = parser.parse_args(argv)
    quiet_libraries()  # no progress bars of the files it writes
    data, _ = parse_yaml(args.scene)
    model = build_random(args.model)
    family = FAMILIES[BUILT_IN[args.model]]
    base = args.scene.resolve().parent
    names = list(dict.fromkeys(c.get("model") for c in named(data, "control") if isinstance(c.get("model"), str)))
    for k, name in enumerate(names):
        path = scene_path(base, name)
        if name == RANDOM_CONTROLNET or path.exists() or looks_like_hub_id(name):
            print(f"kept {name} ({'it exists' if path.exists() else 'not a local folder'})", file=sys.stderr)
            continue
        model.random_controlnet(seed=k).save_pretrained(path, safe_serialization=True)
        print(path)
    for k, reference in enumerate(named(data, "reference")):
        name, weight = reference.get("model"), reference.get("weight")
        if not isinstance(name, str) or not isinstance(weight, str):
            continue
        if not family.ip_adapters:
            print(f"kept {name} ({family.label} models take no IP-Adapter)", file=sys.stderr)
            continue
        weight = weight if "/" in weight else f"{H94_FOLDERS[family.name]}/{weight}"  # h94's layout, as render reads it
        if looks_like_hub_id(name) and not scene_path(base, name).exists():
            print(f"kept {name} (not a local folder)", file=sys.stderr)
            continue
        if (scene_path(base, name) / weight).exists():
            print(f"kept {name}/{weight} (it exists)", file=sys.stderr)
            continue
        print(save_random_ip_adapter(model.denoiser, scene_path(base, name), seed=k, weight=weight))
    return 0


if __name__ == "__main__":
    sys.exit(main())
