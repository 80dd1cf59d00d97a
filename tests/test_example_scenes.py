"""The example scenes in scenes/: each validates with no problem and no warning, its canvas and regions land
where its YAML says (cell by cell), the files it names exist, its model's family is known before anything
is downloaded and takes its scheduler and canvas, and no prompt is cut by the text encoder. (Each renders
on tiny-random under `multidiff smoke`: tests/test_distributed.py.)"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from multidiff_cli.catalog import DEFAULT_MODEL, detect_family
from multidiff_cli.scene import load_scene, region_cells

SCENES_DIR = Path(__file__).resolve().parents[1] / "scenes"
SCENES = sorted(SCENES_DIR.glob("*.yaml"))
CELL_PX = 8


def test_there_are_example_scenes_of_every_kind():
    raw = [yaml.safe_load(path.read_text()) for path in SCENES]
    assert len(SCENES) >= 10
    assert any(any("mask" in region for region in scene.get("regions", [])) for scene in raw)  # mask regions
    assert any(scene.get("width", 512) > 2 * scene.get("height", 512) for scene in raw)  # panoramas
    assert any(scene.get("wrap") == "horizontal" for scene in raw) and any("init_image" in scene for scene in raw)


def cells_of_box(box, latent_hw, cell_px: int = CELL_PX) -> np.ndarray:
    """The cells whose centre lies in [x0, x1) x [y0, y1), cell by cell."""
    x0, y0, x1, y1 = box
    h, w = latent_hw
    return np.array([[x0 <= (c + 0.5) * cell_px < x1 and y0 <= (r + 0.5) * cell_px < y1 for c in range(w)]
                     for r in range(h)])


def cells_of_mask(path: Path, latent_hw) -> np.ndarray:
    """The cells whose centre pixel is white (half grey or more) in the mask PNG stretched over the canvas."""
    h, w = latent_hw
    with Image.open(path) as image:
        grey = np.asarray(image.convert("L"))
    rows = [min(int((r + 0.5) * grey.shape[0] / h), grey.shape[0] - 1) for r in range(h)]
    cols = [min(int((c + 0.5) * grey.shape[1] / w), grey.shape[1] - 1) for c in range(w)]
    return grey[np.ix_(rows, cols)] >= 128


@pytest.mark.parametrize("path", SCENES, ids=lambda path: path.name)
def test_an_example_scene_validates_cleanly_and_lands_where_its_yaml_says(path, cli):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    scene = load_scene(path)
    checked = cli("validate", path)
    regions = len(raw.get("regions", []))
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.strip() == (f"{path}: ok ({regions} region{'' if regions == 1 else 's'}, "
                                      f"{scene.width}x{scene.height})")
    assert checked.stderr == ""  # no warning either

    if "init_image" in raw:  # the canvas is the picture's, its sides rounded down to whole cells
        picture = path.parent / raw["init_image"]
        assert picture.is_file()
        with Image.open(picture) as image:
            cell = scene.cell_px
            assert (scene.width, scene.height) == (image.width // cell * cell, image.height // cell * cell)
    assert (scene.width, scene.height) == (raw.get("width", scene.width), raw.get("height", scene.height))
    assert scene.prompt == raw["prompt"] and len(scene.regions) == regions

    latent_hw = scene.latent_hw  # the family's cells (FLUX.2 klein's are 16 px patches)
    covered = np.zeros(latent_hw, dtype=bool)
    for i, region in enumerate(raw.get("regions", [])):
        assert scene.regions[i].prompt == region["prompt"]
        if "box" in region:
            expected = cells_of_box(region["box"], latent_hw, scene.cell_px)
        else:
            mask = path.parent / region["mask"]
            assert mask.is_file(), mask
            expected = cells_of_mask(mask, latent_hw)
        cells = region_cells(scene, i)
        assert cells.any() and np.array_equal(cells, expected), f"regions[{i}]"
        covered |= cells
    if regions:
        assert not covered.all()  # the global prompt keeps some of the canvas

    family = detect_family(raw.get("model", DEFAULT_MODEL))
    assert family is not None, raw.get("model")  # known without downloading anything
    assert scene.scheduler in family.scheduler_names
    assert scene.width % family.align_px == 0 and scene.height % family.align_px == 0


@pytest.mark.parametrize("path", SCENES, ids=lambda path: path.name)
def test_no_example_scene_warns_of_a_long_prompt(tiny, path):
    scene = load_scene(path)
    texts = [("prompt", scene.full_prompt(scene.prompt)), ("negative_prompt", scene.negative_prompt)]
    for i, region in enumerate(scene.regions):
        texts.append((f"regions[{i}].prompt", scene.full_prompt(region.prompt)))
        texts.append((f"regions[{i}].negative_prompt", region.negative_prompt or ""))
    assert tiny.truncation_warnings(texts) == []


def test_the_two_character_example_scene_is_valid_once_its_loras_are_there(cli, tmp_path):
    example = SCENES_DIR / "lora" / "two_characters.yaml"
    scene_path = tmp_path / example.name
    shutil.copy(example, scene_path)
    missing = cli("validate", scene_path)
    assert missing.exit_code == 2 and missing.stderr.count("no such file") == 3
    (tmp_path / "loras").mkdir()
    for name in ("film_look", "alice", "bob"):  # validation reads a LoRA file's header, not its layers
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(tmp_path / "loras" / f"{name}.safetensors"))
    assert cli("validate", scene_path).exit_code == 0
    scene = load_scene(scene_path)
    assert [lora.scale for lora in scene.loras + scene.regions[0].loras + scene.regions[1].loras] == [0.6, 0.9, 0.8]
