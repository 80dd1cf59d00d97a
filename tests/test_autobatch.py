"""`max_batch: auto`: UNet samples per call chosen per device and view size, recorded, and never changing
the picture beyond rounding (the bench's batch-size sweep: tests/test_bench.py)."""
from __future__ import annotations

import json

import pytest
import torch

from multidiff_cli.models.batching import (
    CPU_CALL_BYTES, FALLBACK_SAMPLES_PER_CALL, MAX_SAMPLES_PER_CALL, auto_samples_per_call, call_bounds,
)
from multidiff_cli.models.sd import unet_bytes_per_sample
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import plan_render, render
from multidiff_cli.scene import load_scene

GIB = 2**30


class SD2Config:  # the numbers of SD2-base's UNet config the rule reads
    block_out_channels = (320, 640, 1280, 1280)


@pytest.mark.parametrize("view_cells, expected", [(64 * 64, 6), (32 * 32, 24), (16 * 16, 96)])
def test_auto_on_the_cpu_picks_the_measured_fastest_sizes_for_sd2(view_cells, expected):
    per_sample = unet_bytes_per_sample(SD2Config, view_cells, torch.float32)
    assert auto_samples_per_call("cpu", per_sample, free_bytes=64 * GIB) == expected
    assert auto_samples_per_call("cpu", per_sample, free_bytes=None) == expected
    # little free memory bounds it further, never below one sample
    assert auto_samples_per_call("cpu", per_sample, free_bytes=per_sample) == 1


@pytest.mark.parametrize("samples, most, sizes", [
    (5, 4, [3, 2]), (7, 3, [3, 2, 2]), (8, 4, [4, 4]), (18, 4, [4, 4, 4, 3, 3]), (3, 16, [3]), (1, 1, [1]), (5, 1, [1] * 5),
])
def test_a_steps_samples_take_the_fewest_calls_as_even_as_can_be(samples, most, sizes):
    bounds = call_bounds(samples, most)
    assert [end - start for start, end in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == samples and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_auto_on_cuda_fills_the_free_memory_within_bounds():
    per_sample = unet_bytes_per_sample(SD2Config, 64 * 64, torch.float16)  # about 0.1 GiB
    assert auto_samples_per_call("cuda", per_sample, free_bytes=40 * GIB) == int(0.8 * 40 * GIB // per_sample) > 16
    assert auto_samples_per_call("cuda", per_sample, free_bytes=per_sample // 2) == 1
    assert auto_samples_per_call("cuda", 1, free_bytes=80 * GIB) == MAX_SAMPLES_PER_CALL
    assert auto_samples_per_call("mps", per_sample, free_bytes=None) == FALLBACK_SAMPLES_PER_CALL
    # float16 samples are half the bytes of float32 ones: twice as many fit
    assert unet_bytes_per_sample(SD2Config, 4096, torch.float32) == 2 * per_sample


def test_the_plan_records_auto_and_an_explicit_max_batch_overrides_it(tiny, write_scene):
    auto = plan_render(load_scene(write_scene("prompt: p\nwidth: 1024\nheight: 512\n")), tiny)
    assert auto.auto_batch and auto.samples_per_call == tiny.auto_samples_per_call(64 * 64)
    per_sample = unet_bytes_per_sample(tiny.unet.config, 64 * 64, tiny.dtype)
    assert 1 <= auto.samples_per_call <= max(1, CPU_CALL_BYTES // per_sample)
    said = plan_render(load_scene(write_scene("prompt: p\nmax_batch: auto\n")), tiny)
    assert said.auto_batch and said.samples_per_call == auto.samples_per_call
    fixed = plan_render(load_scene(write_scene("prompt: p\nmax_batch: 3\n")), tiny)
    assert (fixed.samples_per_call, fixed.auto_batch) == (3, False)


@pytest.mark.parametrize("value", ["fast", 0, "16"])
def test_max_batch_is_auto_or_a_positive_number(write_scene, value):
    from multidiff_cli.errors import SceneError

    with pytest.raises(SceneError, match="max_batch") as raised:
        load_scene(write_scene(f"prompt: p\nmax_batch: {json.dumps(value)}\n"))
    # one line for the one mistake, naming both alternatives, not a line per alternative in pydantic's names
    (line,) = str(raised.value).splitlines()
    assert line.endswith(f"or 'auto' (got {value!r})") and "literal[" not in line and "constrained-int" not in line


def test_auto_renders_the_picture_of_a_fixed_batch_up_to_rounding(tiny, write_scene, assert_close_batched):
    text = ("prompt: hills\nwidth: 576\nheight: 64\nsteps: 2\nbootstrap_steps: 1\nregions:\n"
            "  - prompt: a castle\n    box: [0, 0, 256, 64]\n")
    auto = render(load_scene(write_scene(text)), tiny, seed=5)
    one = render(load_scene(write_scene(text + "max_batch: 1\n")), tiny, seed=5)
    assert plan_render(load_scene(write_scene(text)), tiny).samples_per_call > 1  # the calls did differ
    assert_close_batched(auto.latents, one.latents, guidance=7.5, steps=2)


def test_metadata_and_inspect_show_the_samples_per_call(cli, write_scene, tmp_path):
    scene = write_scene("prompt: p\nwidth: 64\nheight: 64\nsteps: 1\n")
    for extra, auto in (([], True), (["--max-batch", "3"], False)):
        out = tmp_path / f"{auto}.png"
        result = cli("render", str(scene), "--model", "tiny-random", "-o", str(out), "-q", *extra)
        assert result.exit_code == 0, result.output
        batch = read_metadata(out)["unet_batch"]
        assert batch["auto"] is auto and (batch["samples_per_call"] == 3 or auto) and batch["samples_per_call"] >= 1
        shown = cli("inspect", str(out)).stdout
        label = "auto" if auto else "max_batch"
        assert f"samples_per_call: {batch['samples_per_call']} ({label})" in shown


def test_the_cpu_decoder_runs_channels_last_and_decodes_the_same_picture():
    """speed_up puts the VAE channels-last on the CPU (faster there); pixels move by float rounding only."""
    import numpy as np

    from multidiff_cli.models.random_weights import build_tiny_random

    components = build_tiny_random().to(torch.device("cpu"), torch.float32)
    latents = torch.randn((1, 4, 16, 24), generator=torch.Generator().manual_seed(0))
    before = np.asarray(components.codec.decode(latents)).astype(int)
    components.speed_up()
    conv = components.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert np.abs(np.asarray(components.codec.decode(latents)).astype(int) - before).max() <= 1


