"""The benchmark runs on the tiny model and reports every figure: its paths, the width and batch-size sweeps,
its diffusers panorama peer, LoRAs; refusals in one line (timings are never asserted)."""
from __future__ import annotations

import json

import pytest

from multidiff_cli.catalog import BUILT_IN, FAMILIES

import torch

from multidiff_cli.bench.peer import peer_row
from multidiff_cli.bench.sampler import BenchConfig, run_bench
from multidiff_cli.output.report import bench_summary

PATH_FIELDS = {
    "unet_samples_per_step", "seconds_per_step", "sampling_seconds", "non_unet_share", "peak_memory_bytes",
    "peak_memory_kind", "step_seconds",
}


def test_bench_command_writes_json_with_every_field(cli, tmp_path, guided_atol, bench_in_process):
    out = tmp_path / "bench.json"
    result = cli("bench", "--model", "tiny-random", "--size", "64", "--steps", "3",
                                      "--regions", "3", "--device", "cpu", "--json", str(out))
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


def test_bench_rejects_a_model_it_cannot_build(cli):
    result = cli("bench", "--model", "stabilityai/stable-diffusion-2-base")
    assert result.exit_code == 2
    assert all(name in result.stderr for name in ("sd2-random", "sdxl-random", "tiny-random", "tiny-sdxl-random"))


def test_the_bench_runs_sdxl_shapes_with_pooled_embeds_and_time_ids(guided_atol):
    config = BenchConfig(model="tiny-sdxl-random", size_px=64, steps=2)
    report = run_bench(config, in_process=True)
    assert report["relative_difference"] <= guided_atol(torch.ones(()), guidance=config.guidance_scale, steps=2)
    assert report["unet_samples_ratio"] == 5 / 8


def test_width_sweep_reports_views_and_samples_growing_with_width(cli, tmp_path, bench_in_process):
    out = tmp_path / "sweep.json"
    result = cli("bench", "--model", "tiny-random", "--size", "64", "--steps", "2",
                                      "--regions", "1", "--device", "cpu", "--widths", "256,640", "--json", str(out))
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


@pytest.mark.parametrize("model, per_region", [("tiny-random", 2), ("tiny-sdxl-random", 2), ("tiny-flux-random", 1)])
def test_bench_controls_times_region_controlnets_against_none(model, per_region):
    """--controls N: multidiff with N regions under ControlNets of their own against multidiff without; with
    classifier-free guidance each controlled region adds its own unconditional sample (N+2+N a step) and its
    ControlNet runs on that region's two samples, one call a step, timed; FLUX.1-dev (guidance embedded, no
    unconditional pass) adds no sample and runs each ControlNet on its region's one."""
    family = FAMILIES[BUILT_IN[model]]
    config = BenchConfig(model=model, size_px=64, steps=2, regions=3, controls=2, scheduler=family.default_scheduler,
                         guidance_scale=family.default_guidance)
    report = run_bench(config, in_process=True)
    assert list(report["paths"]) == ["multidiff", "multidiff+controls"]
    plain, controlled = report["paths"]["multidiff"], report["paths"]["multidiff+controls"]
    unconditional = per_region - 1
    assert plain["unet_samples_per_step"] == 4 + unconditional and plain["controlnet_calls_per_step"] == 0
    assert controlled["unet_samples_per_step"] == 4 + unconditional * (1 + 2)
    assert controlled["controlnet_samples_per_step"] == 2 * per_region and controlled["controlnet_calls_per_step"] == 2
    assert controlled["controlnet_seconds_per_call"] > 0
    assert report["relative_difference"] > 0  # the ControlNets change the picture
    summary = bench_summary(report)
    assert summary.startswith("2 region ControlNets: ") and f"a ControlNet call of {per_region} sample{'s' if per_region > 1 else ''} costs" in summary


@pytest.mark.parametrize("options, says", [
    (["--regions", "1", "--controls", "2"], "--controls: at most --regions (1): each ControlNet belongs to one region"),
    (["--model", "tiny-sd3-random", "--controls", "1"], "--controls: SD3.5 models take no ControlNets; tiny-random, "
                                                        "sd2-random, tiny-sdxl-random, sdxl-random, tiny-flux-random, "
                                                        "tiny-flux-schnell-random, flux-random do"),
])
def test_bench_controls_refuses_in_one_line(cli, options, says):
    result = cli("bench", *options)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {says}"


# --- the batch-size sweep and the diffusers panorama peer ------------------------------------------------


def tiny_sweep(cli, tmp_path, *options):
    """`multidiff bench --model tiny-random --size 64 OPTIONS --json F` (exit 0): what it printed, and F read."""
    out = tmp_path / "sweep.json"
    result = cli("bench", "--model", "tiny-random", "--size", "64", "--device", "cpu", *options, "--json", out)
    assert result.exit_code == 0, result.output
    return result.stdout, json.loads(out.read_text())


def test_bench_batch_size_sweep_reports_each_size_and_the_auto_choice(cli, tmp_path, bench_in_process):
    printed, report = tiny_sweep(cli, tmp_path, "--batch-sizes", "1,3")
    assert "auto picks" in printed
    sweep = report["batch_sweep"]
    assert [row["batch_size"] for row in sweep["rows"]] == [1, 3] and sweep["view_hw"] == [8, 8]
    assert all(len(row["runs"]) == 2 and row["seconds_per_sample"] == min(row["runs"]) for row in sweep["rows"])
    assert sweep["auto_samples_per_call"] >= 1


def test_bench_rejects_bad_batch_sizes(cli):
    result = cli("bench", "--model", "tiny-random", "--batch-sizes", "2,x")
    assert result.exit_code == 2 and "--batch-sizes" in result.stderr


@pytest.mark.parametrize("option", ["--widths", "--batch-sizes", "--window-sizes"])
def test_an_empty_list_option_is_a_mistake_not_the_default_bench(cli, monkeypatch, option):
    """`--window-sizes ""` ran the default bench, as if the option were not there."""
    import multidiff_cli.bench.command as command

    monkeypatch.setattr(command, "run_bench", lambda *args, **kwargs: pytest.fail("the default bench ran"))
    result = cli("bench", "--model", "tiny-random", option, "")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {option}: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_peer_row_matches_diffusers_panorama_pipeline_up_to_rounding():
    """The peer row's own code path: the same picture as diffusers' StableDiffusionPanoramaPipeline."""
    report = peer_row(BenchConfig(model="tiny-random", size_px=64, width_px=576, steps=1), in_process=True)
    assert {path["views"] for path in report["paths"].values()} == {2}  # a 72-cell-wide canvas: 2 views, 8 apart
    assert report["paths"]["panorama pipeline"]["samples_per_call"] == 2
    assert report["max_pixel_difference"] <= 1  # float32 rounding, then 8-bit rounding
    assert report["time_ratio"] > 0
    for path in report["paths"].values():  # the UNet's and the decoder's shares of the whole render
        assert 0 < path["unet_seconds"] < path["seconds"] and 0 < path["decode_seconds"] < path["seconds"]


@pytest.mark.parametrize("options, says", [
    (["--peer"], "--peer runs SD-shaped models (tiny-random, sd2-random): diffusers' panorama pipeline, the peer, "
                 "is SD's; not tiny-sdxl-random"),
    (["--batch-sizes", "1,2"], "--batch-sizes runs SD-shaped models (tiny-random, sd2-random): its UNet calls give "
                               "SD's text conditioning alone; not tiny-sdxl-random"),
    (["--batch-sizes", "1", "--peer"], "--batch-sizes and --peer run SD-shaped models (tiny-random, sd2-random): its "
                                       "UNet calls give SD's text conditioning alone; diffusers' panorama pipeline, "
                                       "the peer, is SD's; not tiny-sdxl-random"),
])
def test_peer_and_sweep_refuse_sdxl_models_in_one_line_with_their_own_reason(cli, options, says):
    result = cli("bench", "--model", "tiny-sdxl-random", *options)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {says}"


@pytest.mark.slow
def test_a_bench_path_runs_in_a_spawned_child_that_imports_the_bench_afresh_and_reports_back():
    from multidiff_cli.bench.process import in_fresh_process
    from multidiff_cli.bench.sampler import bench_config

    args = ("tiny-random", 64, 3, 3, 1, None, "cpu", None, False, None)
    assert in_fresh_process(bench_config, *args) == bench_config(*args)


@pytest.mark.slow
def test_a_bench_child_killed_before_it_reports_is_an_error_not_a_hang():
    import os

    from multidiff_cli.bench.sampler import in_fresh_process
    from multidiff_cli.errors import BenchError

    with pytest.raises(BenchError, match="bench _exit died with exit code 3"):
        in_fresh_process(os._exit, 3)


def test_bench_width_and_region_px_lay_small_squares_along_a_panorama(cli):
    from multidiff_cli.bench.sampler import bench_config, bench_scene
    from multidiff_cli.models.random_weights import bench_model

    config = bench_config("tiny-random", 64, 4, 2, 0, None, "cpu", None, False, None, width=512, region_px=32)
    assert (config.canvas_width, config.size_px, config.region_px) == (512, 64, 32)
    weights, _, _ = bench_scene(config, bench_model("tiny-random"), (64, 64))
    assert weights.shape[-2:] == (8, 64)
    for p in range(1, 5):  # each a 4x4-cell square, centred in its quarter of the width and in the height
        rows, cols = (weights[p, 0] > 0).nonzero(as_tuple=True)
        assert (rows.min(), rows.max(), cols.max() - cols.min()) == (2, 5, 3)
        assert abs((cols.min() + cols.max() + 1) / 2 - (p - 0.5) * 16) <= 1
    refused = cli("bench", "--size", "64", "--width", "128", "--regions", "4", "--region-px", "48")
    assert refused.exit_code == 2 and "--region-px: a multiple of 8 that fits --regions (4) squares" in refused.stderr


def test_window_sweep_times_one_sample_per_window_side_against_the_native_view(cli, tmp_path, bench_in_process):
    """`bench --window-sizes`: a row per side and the native view's own (its shares 1), each share the row's
    cells and best time over the view's; the break-even is where a window's two samples cost the view's one."""
    printed, report = tiny_sweep(cli, tmp_path, "--window-sizes", "256,128")
    assert "2 samples vs view" in printed
    sweep = report["window_sweep"]
    rows, view = sweep["rows"], sweep["rows"][-1]
    assert [row["side_px"] for row in rows] == [128, 256, sweep["view_px"]] and sweep["view_px"] > 256
    assert (view["cells_share"], view["time_share"]) == (1, 1)
    for row in rows:
        assert row["cells_share"] == row["cells"] / view["cells"] == (row["side_px"] / sweep["view_px"]) ** 2
        assert len(row["runs"]) == 2 and row["time_share"] == min(row["runs"]) / view["seconds_per_sample"]


def test_the_break_even_is_linear_between_the_sizes_around_half_a_view_s_time():
    from multidiff_cli.bench.peer import break_even

    rows = [{"cells_share": 0.25, "time_share": 0.2}, {"cells_share": 0.5, "time_share": 0.4},
            {"cells_share": 0.75, "time_share": 0.6}, {"cells_share": 1.0, "time_share": 1.0}]
    assert break_even(rows) == pytest.approx(0.625)
    assert break_even(rows[:2]) is None  # nothing measured reaches half a view's time


@pytest.mark.parametrize("sizes", ["256,x", "100", "0"])
def test_bench_rejects_bad_window_sizes_in_one_line(cli, sizes):
    result = cli("bench", "--model", "tiny-random", "--window-sizes", sizes)
    assert result.exit_code == 2 and result.stderr.startswith("error: --window-sizes: ")
    assert len(result.stderr.strip().splitlines()) == 1
