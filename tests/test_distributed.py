"""Batches across processes (torchrun, gloo on the CPU) and the smoke command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from multidiff_cli.run.batch import BatchRequest, RunSettings
from multidiff_cli.run.distributed import World, split_jobs, world_from_env
from multidiff_cli.output.png import read_metadata

ROOT = Path(__file__).resolve().parents[1]
SCENE = "prompt: a room\nwidth: 96\nheight: 64\nsteps: 2\nregions:\n  - prompt: a sofa\n    box: [16, 16, 80, 64]\n"


@pytest.mark.parametrize(
    ("count", "world", "expected"),
    [
        (4, 2, [[0, 2], [1, 3]]),
        (5, 2, [[0, 2, 4], [1, 3]]),
        (7, 3, [[0, 3, 6], [1, 4], [2, 5]]),
        (2, 4, [[0], [1], [], []]),  # more ranks than jobs: some ranks idle
        (0, 3, [[], [], []]),
        (1, 1, [[0]]),
        (10, 10, [[i] for i in range(10)]),
    ],
)
def test_split_gives_every_job_to_exactly_one_rank_in_near_equal_shares(count, world, expected):
    shares = [split_jobs(count, world, rank) for rank in range(world)]
    assert shares == expected  # round-robin
    assert sorted(i for share in shares for i in share) == list(range(count))  # each job exactly once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_split_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        split_jobs(4, 2, 2)


def test_world_comes_from_the_launcher_s_environment():
    assert world_from_env({}) == World(0, 1, 0)
    world = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.is_main, world.distributed) == (3, 4, 1, False, True)


def run_cli(args, cwd, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MULTIDIFF_DEVICE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    cmd = [*launcher, "-m", "multidiff_cli", "render", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_render_each_job_once_with_single_process_pixels(cli, tmp_path):
    """Four scenes without seeds on two ranks: the random seeds are drawn once (on rank 0), so every rank plans the
    same batch; each picture is written once, printed once as the file it is, and holds the pixels one process
    renders from the scene file with the seed it records."""
    rooms = ["room", "hall", "den", "loft"]
    for name in rooms:
        (tmp_path / f"{name}.yaml").write_text(SCENE.replace("a room", f"a {name}"))
    options = ["--model", "tiny-random", "-q", "--device", "cpu"]
    two = run_cli([*(f"{name}.yaml" for name in rooms), *options, "--grid", "--output-dir", "two"], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr
    written = sorted((tmp_path / "two").glob("*-*.png"))
    written = [path for path in written if path.name != "batch-grid.png"]
    assert sorted(path.name.split("-")[0] for path in written) == sorted(rooms)  # one picture a scene
    for path in written:
        assert path.stem.split("-", 1)[1] == str(read_metadata(path)["scene"]["seed"])
    # -q: stdout holds the written paths and nothing else, each once, as named on disk (a pipe, not a terminal)
    assert sorted(two.stdout.splitlines()) == sorted([f"two/{path.name}" for path in written] + ["two/batch-grid.png"])
    assert two.stderr.count("rendered 4 of 4") == 1  # the summary comes once, from rank 0
    assert (tmp_path / "two" / "batch-grid.png").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as each rank computes (OMP_NUM_THREADS=1): the same roundings
    try:  # each scene file again, in this process, with the seed its rank drew
        for path in written:
            name, seed = path.stem.split("-", 1)
            one = cli("render", f"{name}.yaml", "--seed", seed, *options, "-o", f"one/{path.name}", cwd=tmp_path)
            assert one.exit_code == 0, one.stderr
    finally:
        torch.set_num_threads(threads)
    for path in written:
        with Image.open(path) as a, Image.open(tmp_path / "one" / path.name) as b:
            assert a.tobytes() == b.tobytes()


def test_every_rank_plans_a_seedless_batch_from_rank_0_s_draw(monkeypatch, tmp_path):
    """Under torchrun each rank's own random draw differs; the seeds of scenes that give none come from rank 0's
    draw, broadcast to every rank, so every rank plans the same jobs. The torchrun test cannot see this (each rank
    reports what it wrote): here two ranks run in turn in this process, each with a draw of its own, and the
    stand-in broadcast hands every rank rank 0's value, as torch.distributed does."""
    import multidiff_cli.run.batch as batch
    from multidiff_cli.run import distributed
    from multidiff_cli.run.plan import plan_jobs

    for name in ("room", "hall"):
        (tmp_path / f"{name}.yaml").write_text(SCENE.replace("a room", f"a {name}"))
    sent, planned, draws = [], {}, iter([111, 222])  # rank 0's own draw, then rank 1's

    def broadcast(world, value):
        sent.append(value)
        return sent[0]  # rank 0's, which runs first

    def plan(*args, **kwargs):
        jobs, failures, notes = plan_jobs(*args, **kwargs)
        planned[distributed.world_from_env().rank] = [(job.label, job.seed) for job in jobs]
        return jobs, failures, notes

    class NoRendering:
        def __init__(self, *args):
            pass

        def run(self, jobs, contain):
            return [], [], 0

    for name in ("start", "stop", "barrier"):
        monkeypatch.setattr(distributed, name, lambda world: None)
    monkeypatch.setattr(distributed, "gather", lambda world, value: [value] * world.size)
    monkeypatch.setattr(distributed, "share_from_main", broadcast)
    monkeypatch.setattr(batch.secrets, "randbits", lambda bits: next(draws))
    monkeypatch.setattr(batch, "plan_jobs", plan)
    monkeypatch.setattr(batch, "Renderer", NoRendering)
    request = BatchRequest([tmp_path / "room.yaml", tmp_path / "hall.yaml"], overrides={"model": "tiny-random"},
                           output_dir=tmp_path / "out")
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world_from_env", lambda rank=rank: World(rank, 2, rank))
        batch.run_batch(request, RunSettings())
    assert sent == [111, 222]  # each rank drew its own
    assert planned[0] == planned[1]  # and planned rank 0's seeds
    assert len({seed for _, seed in planned[0]}) == 2


SMOKE = ("smoke", "--model", "tiny-random", "--steps", "1", "-q")


@pytest.fixture
def small_scenes(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    (folder / "a.yaml").write_text(SCENE)
    (folder / "b.yaml").write_text(SCENE.replace("width: 96", "width: 128"))
    return folder


def test_smoke_renders_and_checks_every_scene(cli, small_scenes, tmp_path):
    from multidiff_cli.output.png import read_metadata

    result = cli(*SMOKE, "--scenes", str(small_scenes), "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "a.yaml" in result.stdout and "b.yaml" in result.stdout and "128x64" in result.stdout
    assert result.stdout.count(" ok ") == 2
    # the scenes give no seed: each picture is <scene>-<its random seed>.png, the seed recorded
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name.split("-")[0] for p in written] == ["a", "b"]
    assert [p.stem.split("-", 1)[1] for p in written] == [str(read_metadata(p)["scene"]["seed"]) for p in written]


def test_smoke_fails_when_a_scene_is_broken(cli, small_scenes, tmp_path):
    (small_scenes / "c.yaml").write_text(SCENE.replace("box: [16, 16, 80, 64]", "box: [16, 16]"))
    result = cli(*SMOKE, "--scenes", str(small_scenes), "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "FAILED" in result.stdout and "c.yaml" in result.stdout
    assert result.stdout.count(" ok ") == 2  # the others still ran


def test_smoke_renders_each_scene_on_its_family_s_tiny_model_and_lists_what_it_skipped(cli, tmp_path):
    """Without --model an SDXL scene is smoked on tiny-sdxl-random (the SDXL path), an SD one on tiny-random,
    and a scene whose LoRA file is not here is listed as skipped, with the file it needs."""
    folder = tmp_path / "scenes"
    (folder / "lora").mkdir(parents=True)
    (folder / "a.yaml").write_text(SCENE)
    (folder / "xl.yaml").write_text("model: stabilityai/stable-diffusion-xl-base-1.0\n" + SCENE)
    (folder / "lora" / "two.yaml").write_text(SCENE + "loras: [alice.safetensors]\n")
    result = cli("smoke", "--steps", "1", "-q", "--scenes", str(folder), "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("│")}
    assert rows["a.yaml"][0] == "tiny-random" and rows["a.yaml"][-1] == "ok"
    assert rows["xl.yaml"][0] == "tiny-sdxl-random" and rows["xl.yaml"][-1] == "ok"
    assert rows["two.yaml"][-1].startswith("skipped: needs files that are not here:")
    assert "lora/alice.safetensors" in "".join(result.stdout.split())  # the cell may wrap in a narrow table
    assert "3 scenes (1 skipped)" in result.stdout
    assert read_metadata(next((tmp_path / "out").glob("xl-*.png")))["family"] == "sdxl"


@pytest.mark.slow
def test_smoke_passes_on_every_example_scene(cli, tmp_path):
    """Every example scene (the 2048x512 panoramas with and without regions too) passes `multidiff smoke`, each
    rendered at its own size and checked (size, not black, seed recorded) on its family's tiny model (FLUX
    scenes on tiny-flux-random, SDXL ones on tiny-sdxl-random); the LoRA and ControlNet scenes, whose files are
    not shipped, are listed as skipped."""
    result = cli("smoke", "--steps", "1", "-q", "--scenes", str(ROOT / "scenes"), "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.count(" ok ") == len(list((ROOT / "scenes").glob("*.yaml")))
    assert "tiny-flux-random" in result.stdout and "tiny-sdxl-random" in result.stdout
    assert "two_characters.yaml" in result.stdout and "skipped" in result.stdout
    assert "knight_in_hall.yaml" in result.stdout and "(2 skipped)" in result.stdout  # its nets are not shipped


def test_a_black_picture_fails_the_check(tmp_path):
    from multidiff_cli.output.png import write_png
    from multidiff_cli.run.smoke import check_picture

    black = write_png(Image.new("RGB", (96, 64)), tmp_path / "black.png", None)
    assert "cannot read" in check_picture(black, 96, 64, 0)  # no metadata either
    record = {"scene": {"seed": 0, "prompt": "x", "steps": 1, "scheduler": "ddim", "guidance_scale": 1,
                        "width": 96, "height": 64, "bootstrap_steps": 0}, "model": "m"}
    write_png(Image.new("RGB", (96, 64)), tmp_path / "b2.png", record)
    assert check_picture(tmp_path / "b2.png", 96, 64, 0) == "the picture is black"
    assert "expected 128x64" in check_picture(tmp_path / "b2.png", 128, 64, 0)


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_and_rank_0_names_the_failed_job(tmp_path):
    (tmp_path / "room.yaml").write_text(SCENE)
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        "import multidiff_cli.run.batch as b\n"
        "real = b.render\n"
        "def render(scene, *args, **kwargs):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('boom on rank 1')\n"
        "    return real(scene, *args, **kwargs)\n"
        "b.render = render\n"
        "from multidiff_cli.cli import main\n"
        "sys.argv = ['multidiff', 'render', *sys.argv[1:]]\n"
        "main()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MULTIDIFF_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           "room.yaml", "--seeds", "0-1", "--model", "tiny-random", "-q", "--device", "cpu", "--output-dir", "out"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "rendered 1 of 2" in done.stderr
    assert "failed: room.yaml seed 1: RuntimeError: boom on rank 1" in done.stderr, done.stderr
    assert (tmp_path / "out" / "room-0.png").exists() and not (tmp_path / "out" / "room-1.png").exists()
