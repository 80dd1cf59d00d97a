"""MultiDiffusion (Bar-Tal et al., 2023) as a pure function of tensors, a noise schedule and a denoiser.

The sampler knows nothing of networks, text or files. Per step it asks the denoiser for every
(view, prompt) prediction, fuses them per latent cell with the region weights (Eq. 5; over views,
Eq. 7), and takes one step of the noise schedule (method/schedule.py) on the whole canvas. For
steps affine in the model output (DDIM, Euler, DPM-Solver, flow matching's Euler, ...) this equals
the paper's "step each prompt, then average", and it keeps one schedule state, so multistep
solvers work unchanged.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from .schedule import NoiseSchedule
from .views import View, full_view

Request = tuple[int, int]
"""(input index, prompt index): one guided prediction the sampler requests of the denoiser."""

UNCONDITIONAL = -1
"""The prompt index of a request for the global prompt's unconditional prediction (its negative prompt's
sample, unguided): what region windows that share the canvas's unconditional read (`shared_unconditional`)."""

Denoiser = Callable[..., torch.Tensor]
"""denoise(inputs, t, requests, guides=None) -> guided model outputs (len(requests), C, h, w), one per request.

`inputs` (M, C, h, w) are the distinct latents of the step (one per view, plus one per view and
region while bootstrapping), already as the network sees them (`NoiseSchedule.model_input`); `t` is
the evaluation's timestep (`NoiseSchedule.timesteps`); request r asks for prompt requests[r][1]'s
prediction on inputs[requests[r][0]]. Requests that share an input may share work (the
unconditional pass). `guides` (M, G, h, w), given only when the sampler has some: each input's crop of
the canvas-aligned guide channels (control images, cell by cell), cropped and shifted as the input was.
Region windows that share the canvas's unconditional (`multidiffusion(shared_unconditional=True)`) also
request UNCONDITIONAL on the canvas' views, and pass `unconditional`: per input, the canvas's unconditional
prediction on its cells (None: none to share), to guide with where the request's negative prompt is the
global prompt's.
"""

StepCallback = Callable[[int, int, torch.Tensor, "torch.Tensor | None"], None]
"""callback(step_index, total_steps, latents, denoised) after every schedule step; `denoised` is
the schedule's estimate of the clean latents when it gives one (DDIM, Euler, flow), else None."""


def fuse_views(predictions: torch.Tensor, requests: list[Request], request_views: list[View], weights: torch.Tensor) -> torch.Tensor:
    """MultiDiffusion, Eq. 5 and 7: per canvas pixel, the weighted mean of every (view, prompt) prediction
    that covers it, each weighted by its prompt's weight there.

    predictions (J, C, hv, wv), or J tensors (C, hv, wv) of their views' sizes; weights (P, 1, H, W) ->
    (1, C, H, W). Where all weights are 0 the result is 0.
    """
    height, width = weights.shape[-2:]
    fused = predictions[0].new_zeros((1, predictions[0].shape[0], height, width))
    total = weights.new_zeros((1, 1, height, width))
    for prediction, (_, prompt), view in zip(predictions, requests, request_views):
        weight = view.crop(weights[prompt])
        view.add_to(fused[0], weight * prediction)
        view.add_to(total[0], weight)
    return torch.where(total > 0, fused / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(fused))


def bootstrap_inputs(x: torch.Tensor, region_masks: torch.Tensor, backgrounds: torch.Tensor) -> torch.Tensor:
    """Bootstrapping (paper, §4.3.1): region i sees x inside its mask and a noised flat colour outside.

    x (1, C, h, w), region_masks (N, 1, h, w), backgrounds (N, C, h, w) -> (N, C, h, w).
    """
    return region_masks * x + (1 - region_masks) * backgrounds


PromptViews = dict[int, list[View]]
"""Region windows: prompt -> the views it runs on instead of the canvas's (its window, a view of its own size)."""


def active_prompts(weights: torch.Tensor, views: list[View], windows: PromptViews | None = None) -> list[list[int]]:
    """For every view, the prompts with weight inside it (the others would be fused with weight 0); a prompt
    with windows of its own is active in those only (`windowed_views`), never in the canvas's views."""
    windows = windows or {}
    return [[p for p in range(weights.shape[0]) if p not in windows and view.crop(weights[p]).any()] for view in views]


def windowed_views(views: list[View], windows: PromptViews | None) -> tuple[list[View], list[list[int]]]:
    """The canvas's views, then every window, with the prompts that run in each: what `step_requests` walks."""
    windows = windows or {}
    extra = [(view, [prompt]) for prompt, own in sorted(windows.items()) for view in own]
    return [*views, *(view for view, _ in extra)], [prompts for _, prompts in extra]


def step_requests(x, weights, views, bootstrap=None, center=False, active=None, guides=None):
    """The inputs and requests of one step: for every view, each prompt with weight inside it.

    bootstrap: (N, C, H, W) bootstrapped region latents, or None outside bootstrapping, when
    every prompt of a view shares the view's crop of x. active: per view, the prompts that run in it
    (default active_prompts(weights, views)). Returns inputs (a list of (C, hv, wv), views of different
    sizes when regions have windows), requests, each request's view, and each request's centering roll
    (or None); and with guides ((1, G, H, W) channels aligned with x), each input's crop of them, shifted with
    its input (else None).
    """
    inputs, requests, request_views, rolls, guide_inputs = [], [], [], [], []
    for view, active_here in zip(views, active if active is not None else active_prompts(weights, views)):
        if not active_here:
            continue
        inputs.append(view.crop(x)[0])
        if guides is not None:
            guide_inputs.append(view.crop(guides)[0])
        shared = len(inputs) - 1
        for prompt in active_here:
            roll = None
            if bootstrap is None or prompt == 0:
                index = shared
            else:
                crop = view.crop(bootstrap[prompt - 1])
                guide = None if guides is None else guide_inputs[shared]  # the view's crop, as the shared input's
                if center:
                    roll = centering_shifts(view.crop(weights[prompt])[None])[0]
                    crop = torch.roll(crop, roll, dims=(-2, -1))
                    guide = None if guide is None else torch.roll(guide, roll, dims=(-2, -1))
                inputs.append(crop)
                if guide is not None:
                    guide_inputs.append(guide)
                index = len(inputs) - 1
            requests.append((index, prompt))
            request_views.append(view)
            rolls.append(roll)
    return inputs, requests, request_views, rolls, guide_inputs if guides is not None else None


def denoise_by_size(denoise: Denoiser, model_input, inputs: list[torch.Tensor], t: torch.Tensor,
                    requests: list[Request], guides: list[torch.Tensor] | None = None,
                    unconditional: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """The denoiser over inputs of one size at a time (views of the canvas, and each size of window): one call
    per size, its requests renumbered; every request's prediction, in order. model_input(stacked inputs);
    guides: each input's guide crop, stacked with it; unconditional: each input's shared unconditional, or None."""
    sizes: dict[tuple[int, ...], list[int]] = {}
    for i, tensor in enumerate(inputs):
        sizes.setdefault(tuple(tensor.shape), []).append(i)
    predictions: list[torch.Tensor | None] = [None] * len(requests)
    for members in sizes.values():
        local = {global_index: k for k, global_index in enumerate(members)}
        order = [r for r, (i, _) in enumerate(requests) if i in local]
        extra = {} if guides is None else {"guides": torch.stack([guides[i] for i in members])}
        if unconditional is not None:
            extra["unconditional"] = [unconditional[i] for i in members]
        out = denoise(model_input(torch.stack([inputs[i] for i in members])), t,
                      [(local[requests[r][0]], requests[r][1]) for r in order], **extra)
        for r, prediction in zip(order, out):
            predictions[r] = prediction
    return predictions


def shared_step(denoise: Denoiser, model_input, t: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                all_views: list[View], canvas_views: int, active: list[list[int]], guides: torch.Tensor | None):
    """One step's predictions where region windows guide with the canvas's unconditional (outside
    bootstrapping, where every view's prompts share the view's crop of x): the canvas' views first, each also
    asked for UNCONDITIONAL where it overlaps a window; those averaged over the canvas where views overlap;
    then the windows, each given that average's crop where the canvas' views ran on every one of its cells.
    Returns the predictions, the requests and their views (the UNCONDITIONAL ones left out)."""
    views, windows = all_views[:canvas_views], all_views[canvas_views:]
    inputs, requests, request_views, _, guide_inputs = step_requests(x, weights, views, active=active[:canvas_views],
                                                                    guides=guides)
    ran = [view for view, here in zip(views, active[:canvas_views]) if here]  # one input each, in order
    under_windows = x.new_zeros((1, *x.shape[-2:]))
    for window in windows:
        window.add_to(under_windows, torch.ones_like(window.crop(under_windows)))
    asked = [(i, UNCONDITIONAL) for i, view in enumerate(ran) if view.crop(under_windows).any()]
    out = denoise_by_size(denoise, model_input, inputs, t, requests + asked, guide_inputs)
    total = x.new_zeros((1, x.shape[1], *x.shape[-2:]))
    count = x.new_zeros((1, 1, *x.shape[-2:]))
    for prediction, (i, _) in zip(out[len(requests):], asked):
        view = ran[i]
        view.add_to(total[0], prediction.to(total.dtype))
        view.add_to(count[0], torch.ones_like(prediction[:1], dtype=count.dtype))
    canvas = total / count.clamp(min=1)
    w_inputs, w_requests, w_views, _, w_guides = step_requests(x, weights, windows, active=active[canvas_views:],
                                                               guides=guides)
    w_ran = [view for view, here in zip(windows, active[canvas_views:]) if here]
    shared = [view.crop(canvas)[0] if bool((view.crop(count) > 0).all()) else None for view in w_ran]
    w_out = denoise_by_size(denoise, model_input, w_inputs, t, w_requests, w_guides, shared) if w_requests else []
    return out[:len(requests)] + w_out, requests + w_requests, request_views + w_views


def centering_shifts(region_masks: torch.Tensor) -> list[tuple[int, int]]:
    """Mask-centering bootstrapping (StreamMultiDiffusion, Lee et al. 2024): for each (1, h, w) mask,
    the whole-cell (dy, dx) that moves its bounding box's centre to the frame's centre."""
    h, w = region_masks.shape[-2:]
    shifts = []
    for mask in region_masks:
        rows = torch.nonzero(mask.reshape(h, w).sum(1) > 0).flatten()
        cols = torch.nonzero(mask.reshape(h, w).sum(0) > 0).flatten()
        if rows.numel() == 0:
            shifts.append((0, 0))
            continue
        centre_y = (int(rows[0]) + int(rows[-1]) + 1) // 2
        centre_x = (int(cols[0]) + int(cols[-1]) + 1) // 2
        shifts.append((h // 2 - centre_y, w // 2 - centre_x))
    return shifts


def unroll(predictions, rolls: list[tuple[int, int] | None]):
    """Shift centred predictions back where their regions are."""
    if not any(rolls):
        return predictions
    return [p if r is None else torch.roll(p, (-r[0], -r[1]), dims=(-2, -1)) for p, r in zip(predictions, rolls)]


def first_step(steps: int, strength: float) -> int:
    """The step an img2img render starts at, as diffusers counts: it runs the last int(steps * strength),
    and at least one (where diffusers would refuse to run none: a draft at --steps 1 still renders)."""
    return steps - max(1, min(int(steps * strength), steps))


def start_latents(noise: torch.Tensor, schedule: NoiseSchedule, init_latents: torch.Tensor | None, start: int) -> torch.Tensor:
    """SDEdit (Meng et al. 2022), as diffusers' img2img pipelines start: a picture's latents noised to the
    level of the first evaluation run; without one, pure noise (text-to-image)."""
    if init_latents is None:
        return schedule.initial(noise)
    return schedule.noised(init_latents, noise, start)


def keep_known(x: torch.Tensor, known: torch.Tensor, changeable: torch.Tensor) -> torch.Tensor:
    """Repaint (diffusers' inpaint pipeline with a 4-channel UNet): outside the changeable cells, the known
    latents at the current noise level."""
    return changeable * x + (1 - changeable) * known


def multidiffusion(
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    denoise: Denoiser,
    weights: torch.Tensor,
    *,
    views: list[View] | None = None,
    windows: PromptViews | None = None,
    bootstrap_steps: int = 0,
    backgrounds: torch.Tensor | None = None,
    center_regions: bool = False,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    start_step: int = 0,
    init_latents: torch.Tensor | None = None,
    known_latents: torch.Tensor | None = None,
    changeable: torch.Tensor | None = None,
    guides: torch.Tensor | None = None,
    shared_unconditional: bool = False,
) -> torch.Tensor:
    """Sample a canvas with MultiDiffusion; returns the final latents (1, C, h, w).

    noise: the initial unit Gaussian latent (1, C, h, w); also the noise that bootstrapping
        backgrounds are noised with, as in the authors' code, so a region's bootstrap input
        is continuous with the canvas' noise at its mask's edge.
    schedule: the noise schedule, its timesteps set (method/schedule.py).
    weights: (P, 1, h, w), index 0 the global prompt, 1..N the regions (weights.region_weights);
        or (steps, P, 1, h, w), one set per step (weights.quantized_weights).
    views: windows covering the canvas (views.make_views); default: the whole canvas as one.
    windows: region windows: a prompt that has some runs on those views only (its window around its region,
        a view of its own size), fused by its weights there like any view (Eq. 7); the others on `views`.
    bootstrap_steps: the first steps in which regions are denoised against flat backgrounds.
    backgrounds: clean flat-colour latents, (bootstrap_steps, N, C, h|1, w|1): one per step and
        region, noised here to each step's level by the schedule.
    center_regions: during bootstrapping, denoise each region shifted so its mask is centred in
        the view, then shift its prediction back (StreamMultiDiffusion's mask-centering).
    generator: for stochastic steps (euler-a, ddpm); a CPU generator keeps devices equal.
    start_step: the first step to run (img2img: steps - int(steps * strength)); bootstrapping counts
        from it, per-step weights keep their own steps.
    init_latents: the clean latents of a picture to start from, noised to start_step's level with
        `noise`; None: pure noise (also where a picture is re-noised all the way, strength 1, as
        diffusers' inpaint pipeline starts).
    known_latents, changeable: clean latents to keep, and (1, 1, h, w) 1 where they may change; after
        every step the other cells are set to known_latents noised to the next step's level (clean
        after the last), as diffusers' inpaint pipeline does with a 4-channel UNet.
    guides: (1, G, h, w) channels aligned with the canvas cell by cell (control images, as the family's
        ControlNets read them): cropped with every input (and shifted with a centred one) and passed to the
        denoiser with them.
    shared_unconditional: outside bootstrapping, a region on a window guides with the canvas's unconditional
        prediction on the window's cells (the global prompt's negative sample on the canvas' views, averaged
        where views overlap), as ComfyUI's area conditioning does, instead of sampling its own on the window:
        one sample a window instead of two. Where a window reaches cells no canvas view ran on that step, or
        its negative prompt is not the global prompt's, it samples its own.
    """
    per_step = weights.dim() == 5
    regions = weights.shape[-4] - 1
    bootstrapping = bootstrap_steps > 0 and regions > 0
    if bootstrapping and (backgrounds is None or backgrounds.shape[0] < bootstrap_steps):
        raise ValueError("bootstrap_steps > 0 needs one background latent per bootstrap step and region")
    views = views or [full_view(tuple(noise.shape[-2:]))]
    all_views, window_prompts = windowed_views(views, windows)

    if (init_latents is None and start_step) or ((known_latents is None) != (changeable is None)):
        raise ValueError("start_step > 0 needs init_latents, and changeable needs known_latents (and back)")
    order = schedule.order  # Heun-type steps take `order` evaluations
    first = start_step * order  # the first evaluation run
    if init_latents is not None or known_latents is not None:
        schedule.begin_at(first)
    x = start_latents(noise, schedule, init_latents, first)
    evaluations = len(schedule.timesteps) - first
    active: dict[int, list[list[int]]] = {}  # per set of weights: the same every step unless per_step
    for i in range(evaluations):
        index, step = first + i, i // order  # step counted from the first step run
        weights_index = min(start_step + step, weights.shape[0] - 1) if per_step else 0
        step_weights = weights[weights_index] if per_step else weights
        if weights_index not in active:
            in_windows = [[p for p in prompts if view.crop(step_weights[p]).any()]
                          for view, prompts in zip(all_views[len(views):], window_prompts)]
            active[weights_index] = active_prompts(step_weights, views, windows) + in_windows
        bootstrap = None
        if bootstrapping and step < bootstrap_steps:
            noised = schedule.noised(backgrounds[step].expand(regions, *x.shape[1:]), noise.expand(regions, *x.shape[1:]), index)
            bootstrap = bootstrap_inputs(x, step_weights[1:], noised)
        model_input = partial(schedule.model_input, index=index)
        if shared_unconditional and windows and bootstrap is None:
            predictions, requests, request_views = shared_step(
                denoise, model_input, schedule.timesteps[index], x, step_weights, all_views, len(views),
                active[weights_index], guides)
        else:
            inputs, requests, request_views, rolls, guide_inputs = step_requests(
                x, step_weights, all_views, bootstrap, center_regions, active[weights_index], guides
            )
            predictions = unroll(denoise_by_size(denoise, model_input, inputs, schedule.timesteps[index], requests,
                                                 guide_inputs), rolls)
        fused = fuse_views(predictions, requests, request_views, step_weights)
        x, denoised = schedule.step(fused, index, x, generator)
        if changeable is not None:
            last = i == evaluations - 1
            known = known_latents if last else schedule.noised(known_latents, noise, index + 1)
            x = keep_known(x, known, changeable)
            denoised = None if denoised is None else keep_known(denoised, known_latents, changeable)
        if callback is not None:
            callback(i, evaluations, x, denoised)
    return x
