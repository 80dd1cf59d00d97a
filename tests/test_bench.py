"""The benchmark runs on the tiny model and reports every figure (timings are never asserted)."""
from __future__ import annotations

import json

import pytest

import torch
from typer.testing import CliRunner

from multidiff_cli.bench.sampler import BenchConfig, run_bench
from multidiff_cli.cli import app

PATH_FIELDS = {
    "unet_samples_per_step", "seconds_per_step", "sampling_seconds", "non_unet_share", "peak_memory_bytes",
    "peak_memory_kind", "step_seconds",
}


def test_bench_command_writes_json_with_every_field(tmp_path, guided_atol):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--model", "tiny-random", "--size", "64", "--steps", "3",
                                      "--regions", "3", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "multidiff / reference" in result.stdout
    report = json.loads(out.read_text())
    assert {"config", "device_name", "paths", "sampling_time_ratio", "step_time_ratio", "unet_samples_ratio",
            "relative_difference", "versions"} <= report.keys()
    for path in ("multidiff", "reference"):
        assert PATH_FIELDS <= report["paths"][path].keys()
        assert len(report["paths"][path]["step_seconds"]) == 3
    # 3 regions sharing one negative prompt: N+2 = 5 samples a step against 2(N+1) = 8
    assert report["paths"]["multidiff"]["unet_samples_per_step"] == 5
    assert report["paths"]["reference"]["unet_samples_per_step"] == 8
    # float32: the same picture, up to the roundings of other batches and orders (relative: magnitude 1)
    assert report["relative_difference"] <= guided_atol(torch.ones(()), guidance=7.5, steps=3)


def test_bench_paths_agree_with_bootstrapping_and_a_multistep_scheduler(guided_atol):
    config = BenchConfig(model="tiny-random", size_px=64, steps=3, bootstrap_steps=1, scheduler="dpm++")
    report = run_bench(config, in_process=True)
    assert report["relative_difference"] <= guided_atol(torch.ones(()), guidance=config.guidance_scale, steps=3)
    # bootstrap step: every prompt its own input, so 4 cond + 4 uncond; then 5 a step
    assert report["paths"]["multidiff"]["unet_samples_per_step"] == (8 + 5 + 5) / 3


def test_bench_rejects_a_model_it_cannot_build():
    result = CliRunner().invoke(app, ["bench", "--model", "stabilityai/stable-diffusion-2-base"])
    assert result.exit_code == 2
    assert all(name in result.stderr for name in ("sd2-random", "sdxl-random", "tiny-random", "tiny-sdxl-random"))


def test_the_bench_runs_sdxl_shapes_with_pooled_embeds_and_time_ids(guided_atol):
    config = BenchConfig(model="tiny-sdxl-random", size_px=64, steps=2)
    report = run_bench(config, in_process=True)
    assert report["relative_difference"] <= guided_atol(torch.ones(()), guidance=config.guidance_scale, steps=2)
    assert report["unet_samples_ratio"] == 5 / 8


def test_width_sweep_reports_views_and_samples_growing_with_width(tmp_path):
    out = tmp_path / "sweep.json"
    result = CliRunner().invoke(app, ["bench", "--model", "tiny-random", "--size", "64", "--steps", "2",
                                      "--regions", "1", "--device", "cpu", "--widths", "256,640", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["widths"]
    assert [(r["width_px"], r["views"]) for r in rows] == [(256, 1), (640, 3)]
    assert rows[1]["unet_samples_per_step"] > rows[0]["unet_samples_per_step"]
    assert all(PATH_FIELDS <= r.keys() for r in rows)


@pytest.mark.parametrize("model", ["tiny-random", "tiny-sdxl-random"])
def test_bench_loras_times_region_loras_against_none(model):
    """--loras N: multidiff with N regions on LoRAs of their own against multidiff without; one region
    LoRA adds that region's own unconditional sample (N+3 a step, not N+2) and the switching is timed."""
    config = BenchConfig(model=model, size_px=64, steps=2, regions=3, loras=1)
    report = run_bench(config, in_process=True)
    assert list(report["paths"]) == ["multidiff", "multidiff+loras"]
    assert report["paths"]["multidiff"]["unet_samples_per_step"] == 5
    assert report["paths"]["multidiff+loras"]["unet_samples_per_step"] == 6
    assert report["paths"]["multidiff+loras"]["lora_switch_seconds_per_step"] > 0
    assert report["relative_difference"] > 0  # the LoRA changes the picture
