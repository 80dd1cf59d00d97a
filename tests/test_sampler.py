"""The fused sampler against a plain, obviously-correct per-prompt reference loop (the paper's Eq. 5)."""
from __future__ import annotations

import pytest
import torch

from multidiff_cli.method.schedule import DiffusionSchedule
from multidiff_cli.method.sampler import bootstrap_inputs, centering_shifts, fuse_views, multidiffusion
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.method.views import full_view
from multidiff_cli.method.weights import region_weights
from multidiff_cli.models.random_weights import sd2_scheduler_config
from multidiff_cli.scene.grid import box_cells
from reference import reference_multidiffusion

H, W = 12, 20  # latent cells: non-square, so x and y cannot be swapped unnoticed
BOXES = [(0, 0, 64, 96), (48, 16, 160, 64), (96, 56, 152, 96)]  # pixels; the first two overlap


def weights_for(boxes=BOXES):
    return region_weights([box_cells(b, (H, W)) for b in boxes], (H, W))


def scheduler_for(name: str, steps: int, prediction_type: str = "epsilon"):
    scheduler = make_scheduler(name, sd2_scheduler_config(prediction_type))
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("bootstrap_steps", [0, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fused_step_equals_per_prompt_steps_ddim(bootstrap_steps, prediction_type, prompt_eps, per_request_denoiser,
                                                  assert_close_batched):
    weights = weights_for()
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(0))
    backgrounds = torch.randn((3, len(BOXES), 4, 1, 1), generator=torch.Generator().manual_seed(1))
    fused = multidiffusion(
        noise, DiffusionSchedule(scheduler_for("ddim", 8, prediction_type)), per_request_denoiser, weights,
        bootstrap_steps=bootstrap_steps, backgrounds=backgrounds,
    )
    reference = reference_multidiffusion(
        lambda p, x, t: prompt_eps(p, x), noise, DiffusionSchedule(scheduler_for("ddim", 8, prediction_type)), weights,
        bootstrap_steps=bootstrap_steps, backgrounds=backgrounds,
    )
    assert_close_batched(fused, reference, steps=8)  # fusing before or after the affine step: another order


@pytest.mark.parametrize("name", ["dpm++", "unipc", "euler", "pndm", "heun", "euler-a"])
def test_one_scheduler_state_equals_per_prompt_copies(name, prompt_eps, per_request_denoiser, assert_close_batched):
    """Multistep/stateful solvers: no per-prompt scheduler copies are needed (what diffusers' panorama pipeline does)."""
    weights = weights_for()
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(2))
    backgrounds = torch.randn((2, len(BOXES), 4, 1, 1), generator=torch.Generator().manual_seed(3))
    fused = multidiffusion(
        noise, DiffusionSchedule(scheduler_for(name, 6)), per_request_denoiser, weights, bootstrap_steps=2, backgrounds=backgrounds,
        generator=torch.Generator().manual_seed(4),
    )
    scheduler = scheduler_for(name, 6)  # Heun visits each step twice: len(timesteps) counts evaluations
    reference = reference_multidiffusion(
        lambda p, x, t: prompt_eps(p, x), noise, DiffusionSchedule(scheduler), weights, bootstrap_steps=2,
        backgrounds=backgrounds, generator=torch.Generator().manual_seed(4),
    )
    assert_close_batched(fused, reference, steps=len(scheduler.timesteps))


def test_fuse_is_the_weighted_mean_and_zero_where_no_weight():
    predictions = torch.stack([torch.full((1, 2, 3), v) for v in (1.0, 3.0, 10.0)])
    weights = torch.zeros(3, 1, 2, 3)
    weights[0, :, 0, 0] = 1
    weights[1, :, 0, 0] = 1  # overlap: average of 1 and 3
    weights[2, :, 1, :] = 1
    requests = [(0, 0), (0, 1), (0, 2)]
    fused = fuse_views(predictions, requests, [full_view((2, 3))] * 3, weights)
    assert fused.shape == (1, 1, 2, 3)
    assert fused[0, 0, 0, 0] == 2.0
    assert torch.equal(fused[0, 0, 1], torch.full((3,), 10.0))
    assert torch.equal(fused[0, 0, 0, 1:], torch.zeros(2))  # no weight: 0, not NaN


def test_bootstrap_inputs_replace_only_outside_each_mask_and_leave_the_global_prompt():
    x = torch.full((1, 4, H, W), 5.0)
    masks = weights_for()[1:]
    backgrounds = torch.arange(len(BOXES), dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 4, H, W)
    inputs = bootstrap_inputs(x, masks, backgrounds)
    assert inputs.shape == (len(BOXES), 4, H, W)
    for i in range(len(BOXES)):
        inside = masks[i, 0].bool()
        assert torch.all(inputs[i][:, inside] == 5.0)
        assert torch.all(inputs[i][:, ~inside] == float(i))


def pull_towards(values, scheduler):
    """A denoiser whose ε-prediction says prompt p's clean latent is values[p] (DDIM leaves ~0.03·ε of noise)."""
    alphas = scheduler.alphas_cumprod

    def denoise(inputs, t, requests):
        a = alphas[int(t)]
        return torch.stack([(inputs[i] - a.sqrt() * values[p]) / (1 - a).sqrt() for i, p in requests])

    return denoise


@pytest.mark.parametrize("bootstrap_steps", [0, 4])
def test_each_region_ends_with_its_own_value_on_a_non_square_canvas(bootstrap_steps):
    boxes = [(0, 0, 48, 32), (96, 48, 160, 96)]  # top-left and bottom-right, disjoint
    values = [0.0, 1.5, -2.0]  # background, region 1, region 2
    weights = weights_for(boxes)
    scheduler = scheduler_for("ddim", 20)
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(5))
    latents = multidiffusion(
        noise, DiffusionSchedule(scheduler), pull_towards(values, scheduler), weights, bootstrap_steps=bootstrap_steps,
        backgrounds=torch.zeros(bootstrap_steps, 2, 4, 1, 1),
    )
    for p, value in enumerate(values):
        owned = weights[p, 0].bool()
        assert owned.any()
        assert torch.allclose(latents[0][:, owned], torch.tensor(value), atol=0.15), (p, value)
    # region 1 is the top-left 6x4 cells: rows 0..3, columns 0..5 (x and y not swapped)
    assert torch.allclose(latents[0, :, :4, :6], torch.tensor(1.5), atol=0.15)
    assert torch.allclose(latents[0, :, 6:, 12:], torch.tensor(-2.0), atol=0.15)


def test_bootstrap_zero_needs_no_backgrounds_and_more_bootstrap_needs_them(per_request_denoiser):
    scheduler = scheduler_for("ddim", 4)
    noise = torch.zeros(1, 4, H, W)
    multidiffusion(noise, DiffusionSchedule(scheduler), per_request_denoiser, weights_for(), bootstrap_steps=0)
    with pytest.raises(ValueError, match="background"):
        multidiffusion(noise, DiffusionSchedule(scheduler_for("ddim", 4)), per_request_denoiser, weights_for(), bootstrap_steps=2)


def test_callback_sees_every_step(per_request_denoiser):
    seen = []
    multidiffusion(
        torch.zeros(1, 4, H, W), DiffusionSchedule(scheduler_for("ddim", 5)), per_request_denoiser, weights_for(),
        callback=lambda i, n, x, denoised: seen.append((i, n, tuple(x.shape), tuple(denoised.shape))),
    )
    assert seen == [(i, 5, (1, 4, H, W), (1, 4, H, W)) for i in range(5)]  # DDIM gives its clean estimate


def test_denoiser_gets_one_shared_input_outside_bootstrap_and_one_per_prompt_inside(per_request_denoiser):
    shapes = []

    def recording(inputs, t, requests):
        shapes.append(inputs.shape[0])
        return per_request_denoiser(inputs, t, requests)

    multidiffusion(
        torch.zeros(1, 4, H, W), DiffusionSchedule(scheduler_for("ddim", 5)), recording, weights_for(), bootstrap_steps=2,
        backgrounds=torch.zeros(2, 3, 4, 1, 1),
    )
    assert shapes == [4, 4, 1, 1, 1]


def test_centering_shifts_move_each_mask_s_box_centre_to_the_frame_centre():
    masks = weights_for()[1:]  # cells: rows 0..11 cols 0..7; rows 2..7 cols 6..19; rows 7..11 cols 12..18
    assert centering_shifts(masks) == [(6 - 6, 10 - 4), (6 - 5, 10 - 13), (6 - 9, 10 - 15)]
    for mask, shift in zip(masks, centering_shifts(masks)):
        centred = torch.roll(mask[0], shift, dims=(-2, -1))
        rows = torch.nonzero(centred.sum(1)).flatten()
        cols = torch.nonzero(centred.sum(0)).flatten()
        assert (int(rows[0]) + int(rows[-1]) + 1) // 2 == H // 2
        assert (int(cols[0]) + int(cols[-1]) + 1) // 2 == W // 2


def test_centering_changes_nothing_for_a_translation_equivariant_denoiser():
    """Rolling in and back moves values without arithmetic: a pointwise denoiser gives bit-identical latents."""
    def pointwise(inputs, t, requests):
        return torch.stack([torch.tanh(inputs[i] * (p + 1.0)) for i, p in requests])

    runs = [
        multidiffusion(
            torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(6)), DiffusionSchedule(scheduler_for("ddim", 4)), pointwise,
            weights_for(), bootstrap_steps=2, backgrounds=torch.zeros(2, 3, 4, 1, 1), center_regions=centre,
        )
        for centre in (False, True)
    ]
    assert torch.equal(runs[0], runs[1])


def test_centering_lets_each_region_see_the_frame_centre():
    """A denoiser that marks where the frame centre is: with centering, the mark lands on each mask's centre."""
    seen = []

    def spy(inputs, t, requests):
        seen.append(inputs.clone())
        return torch.zeros(len(requests), *inputs.shape[1:])

    masks = weights_for()[1:]
    x0 = torch.zeros(1, 4, H, W)
    x0[0, :, 3, 2] = 1.0  # a marker inside region 1 (cells: rows 0..11, columns 0..7)
    multidiffusion(
        x0, DiffusionSchedule(scheduler_for("ddim", 2)), spy, weights_for(), bootstrap_steps=1, backgrounds=torch.zeros(1, 3, 4, 1, 1),
        center_regions=True,
    )
    first = seen[0]  # bootstrap step: (4, C, h, w), regions rolled
    dy, dx = centering_shifts(masks)[0]
    assert first[1, 0, (3 + dy) % H, (2 + dx) % W] != 0  # the marker moved with region 1's roll
    assert first[0, 0, 3, 2] != 0  # the global prompt is not rolled


def test_per_step_weights_are_used_step_by_step():
    """(steps, P, 1, h, w) weights: step i asks only for the prompts with weight in its own set, and fuses
    with that set."""
    all_global = region_weights([torch.zeros(H, W)], (H, W))
    all_region = region_weights([torch.ones(H, W)], (H, W))
    per_step = torch.stack([all_global, all_region, all_region])
    requested = []

    def constant(inputs, t, requests):
        requested.append([p for _, p in requests])
        return torch.stack([torch.full(inputs.shape[1:], 1.0 if p == 0 else -1.0) for _, p in requests])

    scheduler = scheduler_for("ddim", 3)
    fused = []
    original = scheduler.step
    scheduler.step = lambda eps, t, x, **kw: fused.append(float(eps.mean())) or original(eps, t, x, **kw)
    multidiffusion(torch.zeros(1, 4, H, W), DiffusionSchedule(scheduler), constant, per_step)
    assert requested == [[0], [1], [1]]  # step 0: the global prompt alone has weight; then the region alone
    assert fused == [1.0, -1.0, -1.0]
