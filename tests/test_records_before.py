"""PNGs rendered before the family redesign (issue 20) render again as they were.

tests/data/before-issue-20/ holds two pictures rendered by multidiff 64de835 (the last commit before
the redesign) with tiny-random and tiny-sdxl-random: a mask scene (its mask beside the pictures, as a
user who shares the picture with its inputs would keep them) and an SDXL box scene with euler. Their
records carry the old `scene_dir` (a folder that does not exist here) and no family."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from multidiff_cli.cli import app
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.plan import load_source

BEFORE = Path(__file__).parent / "data" / "before-issue-20"
PICTURES = ["masked-5.png", "boxes_xl-2.png"]


@pytest.fixture
def before(tmp_path) -> Path:
    """A copy of the old pictures and their mask (a render writes beside its source's folder otherwise)."""
    return Path(shutil.copytree(BEFORE, tmp_path / "before"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("name", PICTURES)
def test_an_old_record_reads_back_to_its_scene_with_the_old_defaults(before, name):
    record = read_metadata(before / name)
    assert "scene_dir" in record and "family" not in record  # written by the old code
    assert not Path(record["scene_dir"]).exists()  # where it was rendered: not on this machine
    loaded = load_source(before / name)
    scene = loaded.scene.model_dump(mode="json", exclude_none=True)
    assert scene == record["scene"]  # scheduler and guidance as recorded, nothing added or lost
    assert loaded.notes == []  # every input file found (the mask beside the picture) with its recorded hash
    if loaded.scene.regions[0].mask is not None:
        assert loaded.scene.path_of(loaded.scene.regions[0].mask) == before / "masks" / "left.png"


@pytest.mark.parametrize("name", PICTURES)
def test_an_old_png_renders_again_as_it_was(before, tmp_path, name):
    out = tmp_path / "again"
    result = CliRunner().invoke(app, ["render", str(before / name), "--output-dir", str(out), "-q"])
    assert result.exit_code == 0, result.output
    again = out / name.replace(".png", "-again.png")
    # Bit-identical on the machine that rendered the fixtures (checked when they were made); another CPU
    # may round a float differently, so a pixel may move by one 8-bit level there.
    assert np.abs(pixels(again) - pixels(before / name)).max() <= 1
    record = read_metadata(again)  # the new record: no absolute path, the family named
    assert "scene_dir" not in record and record["family"] == {"masked-5.png": "sd", "boxes_xl-2.png": "sdxl"}[name]
