"""The one reference MultiDiffusion loop of the tests: the paper's Eq. 5 (regions) and Eq. 7 (views) as
written, the oracle for the fused sampler (method/sampler.py) of every family and schedule.

Per step, every (view, prompt) pair whose prompt has weight inside the view takes its own step: its own
copy of the noise schedule (so a multistep solver keeps that pair's own history), on its own crop of
the latent (inside a bootstrapping step, the prompt's own bootstrapped latent), with its own guided
model output; then every canvas cell is the weighted mean of the stepped crops that cover it, each
weighted by its prompt's weight there. No batching, no fusion before the step, no shared state.

It talks to the noise-schedule protocol only (method/schedule.py: DiffusionSchedule, FlowSchedule), so
the same loop serves diffusion and flow matching. Imported by the test modules (`from reference import
reference_multidiffusion`): a plain module beside conftest.py, not a test module.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from multidiff_cli.scene import load_scene

from multidiff_cli.method.views import View, full_view

ModelOutput = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""model_output(p, x, t) -> prompt p's (guided) model output (1, C, h, w) on x (1, C, h, w), which is
already as the network sees it (NoiseSchedule.model_input), at timestep t."""


def reference_multidiffusion(
    model_output: ModelOutput,
    noise: torch.Tensor,
    schedule,
    weights: torch.Tensor,
    *,
    views: list[View] | None = None,
    bootstrap_steps: int = 0,
    backgrounds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    start_step: int = 0,
    init_latents: torch.Tensor | None = None,
    windows: dict[int, list[View]] | None = None,
    unconditional_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    guided_with: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """MultiDiffusion, step each prompt then average: the final latents (1, C, H, W).

    noise: the initial unit noise (1, C, H, W), also what bootstrapping backgrounds are noised with.
    schedule: a NoiseSchedule with its timesteps set and never stepped (this loop steps copies of it).
    weights: (P, 1, H, W), prompt 0 the global one. views: default the whole canvas.
    backgrounds: (bootstrap_steps, P - 1, C, 1|H, 1|W) clean flat colours, one per step and region;
        during the first `bootstrap_steps` steps run, region p sees x inside its mask and its background,
        noised to the evaluation's level, outside.
    generator: for stochastic steps (one view only): every prompt's step draws the same noise, as the
        sampler's single step on the whole canvas does.
    start_step, init_latents: img2img: the picture's latents noised to the first evaluation run.
    windows: region windows: prompt p in it steps on its own views windows[p] (crops of their own size),
        not on `views`, and is averaged in by its weights there like any view.
    unconditional_output(x, t), guided_with(p, x, t, u): windows that take the canvas's unconditional: after
        bootstrapping, u is unconditional_output on the crop of every canvas view that some prompt of the canvas
        has weight in, averaged where those overlap, and a window's model output is guided_with(p, its crop, t,
        u's crop); model_output where some cell of the window has no such view.
    """
    views = views or [full_view(tuple(noise.shape[-2:]))]
    if generator is not None and len(views) > 1:
        raise ValueError("stochastic steps draw noise of their input's shape: one view only")
    order = schedule.order
    first = start_step * order
    if init_latents is None:
        x = schedule.initial(noise)
    else:
        schedule.begin_at(first)
        x = schedule.noised(init_latents, noise, first)
    windows = windows or {}
    pairs = [(view, p) for view in views for p in range(weights.shape[0]) if p not in windows]
    canvas_pairs = len(pairs)
    pairs += [(view, p) for p, own_views in windows.items() for view in own_views]
    views = [view for view, _ in pairs]
    own = {(v, p): copy.deepcopy(schedule) for v, (view, p) in enumerate(pairs) if view.crop(weights[p]).any()}

    for index in range(first, len(schedule.timesteps)):
        step = (index - first) // order
        t = schedule.timesteps[index]
        state = None if generator is None else generator.get_state()
        canvas_u = None
        if unconditional_output is not None and step >= bootstrap_steps:
            u_total, u_count = torch.zeros_like(x), torch.zeros_like(x[:, :1])
            ran = {}  # each canvas view a prompt has weight in, with one of its pairs' schedules (in this step's state)
            for (v, p), schedule_p in own.items():
                if v < canvas_pairs:
                    ran.setdefault(views[v], schedule_p)
            for view, schedule_v in ran.items():
                view.add_to(u_total[0], unconditional_output(schedule_v.model_input(view.crop(x), index), t)[0])
                view.add_to(u_count[0], torch.ones_like(view.crop(x)[0, :1]))
            canvas_u = torch.where(u_count > 0, u_total / u_count.clamp(min=1), torch.nan)
        total = torch.zeros_like(x)
        count = torch.zeros_like(x[:, :1])
        for (v, p), schedule_p in own.items():
            view, x_p = views[v], x
            if p > 0 and step < bootstrap_steps:
                background = schedule_p.noised(backgrounds[step, p - 1].expand_as(x), noise, index)
                x_p = weights[p] * x + (1 - weights[p]) * background
            crop = view.crop(x_p)
            if generator is not None:
                generator.set_state(state)
            network_input = schedule_p.model_input(crop, index)
            if canvas_u is not None and v >= canvas_pairs and not view.crop(canvas_u).isnan().any():
                output = guided_with(p, network_input, t, view.crop(canvas_u))
            else:
                output = model_output(p, network_input, t)
            stepped, _ = schedule_p.step(output, index, crop, generator)
            weight = view.crop(weights[p])
            view.add_to(total[0], weight * stepped[0])
            view.add_to(count[0], weight)
        x = torch.where(count > 0, total / count, torch.zeros_like(total))
    return x


def guided(unconditional: torch.Tensor, conditional: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance as diffusers' pipelines apply it: none at a scale of 1 or less."""
    return unconditional + guidance * (conditional - unconditional) if guidance > 1 else conditional


def seed_generator(seed: int) -> torch.Generator:
    """The seed's CPU generator, as a render draws its noise from it (and a diffusers pipeline, given it)."""
    return torch.Generator("cpu").manual_seed(seed)


def background_latents(vae, generator: torch.Generator, steps: int, regions: int) -> torch.Tensor:
    """The authors' bootstrapping backgrounds (a flat random colour per step and region), encoded and scaled as the
    flow pipelines (FLUX.1, SD3.5, Z-Image) scale latents: (mean - shift_factor) * scaling_factor."""
    colours = torch.rand((steps * regions, 3, 1, 1), generator=generator) * 2 - 1
    with torch.inference_mode():
        mean = vae.encode(colours.expand(-1, -1, 64, 64)).latent_dist.mean
    latents = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    return latents.mean(dim=(2, 3), keepdim=True).reshape(steps, regions, -1, 1, 1)


def samples_per_step(calls: list[tuple[float, int]]) -> list[int]:
    """(timestep, samples) of every network call -> the samples of each step, in order."""
    per_step: dict[float, int] = {}
    for timestep, rows in calls:
        per_step[timestep] = per_step.get(timestep, 0) + rows
    return list(per_step.values())

def scene_of(write_scene, model, text: str, name: str = "scene.yaml"):
    """A scene file loaded as for this model (its family's defaults and checks)."""
    return load_scene(write_scene(text, name), default_model=model.model_id)


def flux_pipeline(model, kind: str = "text"):
    """diffusers' own FLUX pipeline on the model's parts, with the scheduler FLUX.1 ships (its config)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = {"text": diffusers.FluxPipeline, "img2img": diffusers.FluxImg2ImgPipeline,
           "inpaint": diffusers.FluxInpaintPipeline}[kind]
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config), vae=model.vae,
               text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
               tokenizer_2=model.tokenizer_2, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_pipeline(model, scheduler_name: str = "ddim"):
    """diffusers' StableDiffusionPipeline on a model's own parts (no safety checker, no image encoder: an
    IP-Adapter test loads its own), its scheduler built from the model's config."""
    from diffusers import StableDiffusionPipeline

    from multidiff_cli.models.schedulers import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(scheduler_name, model.scheduler_config), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_step(model, scene, samples_per_call: int = 1):
    """Every prompt's guided prediction at the first step of a 2-step render (the scene's scheduler, or its family's)
    on one random latent, as render runs them (LoRAs, controls and references loaded), and the fused one (Eq. 5):
    (predictions, fused, weights). For tests of what a region's adapter may and may not touch."""
    from pathlib import Path

    from multidiff_cli.method.guidance import guided_denoiser
    from multidiff_cli.method.sampler import fuse_views
    from multidiff_cli.run.render import (encode_conditioning, plan_render, scene_controls, scene_prompts,
                                          scene_references, scene_weights)
    from multidiff_cli.scene import checked_for

    scene = checked_for(scene, model.facts)
    prompts = scene_prompts(scene, model.facts.embedded_guidance, model.embedded_guidance, model.facts.cfg_offset)
    files = sorted({Path(path) for adapters in prompts.adapters for path, _ in adapters})
    if files:
        model.load_loras(files)
    plan = plan_render(scene, model)
    schedule = model.make_schedule(scene.scheduler, 2, plan.view_hw)
    controls, guides = scene_controls(scene, model, schedule, 0)
    conditioning = encode_conditioning(model, prompts, plan)
    references, conditioning = scene_references(scene, model, prompts, conditioning)
    run = model.sample_run(samples_per_call, controls=controls, references=references)
    latent_hw = scene.latent_hw
    x = torch.randn((1, model.latent_channels, *latent_hw), generator=torch.Generator().manual_seed(0))
    requests = [(0, p) for p in range(len(prompts.cond))]
    weights = scene_weights(scene)
    extra = {} if guides is None else {"guides": guides}
    with torch.inference_mode():
        predictions = guided_denoiser(run, conditioning, prompts)(x, schedule.timesteps[0], requests, **extra)
        fused = fuse_views(predictions, requests, [full_view(latent_hw)] * len(requests), weights)
    return predictions, fused, weights


def sd_region_reference(scene, pipes, unet_output, seed: int) -> torch.Tensor:
    """The reference loop for an SD scene (DDIM, its steps and guidance): prompt p (0 the global prompt) encoded
    by pipes[p].encode_prompt with the scene's negative prompt, its guided model output from
    unet_output(p, x, t, hidden_states, conditional), where a test puts what only that prompt's samples get
    (a LoRA, a ControlNet's residuals, image embeddings); noise the seed's first draw, as a render's."""
    from multidiff_cli.method.schedule import DiffusionSchedule
    from multidiff_cli.models.schedulers import make_scheduler
    from multidiff_cli.run.render import scene_weights

    texts = [scene.prompt] + [region.prompt for region in scene.regions]
    with torch.inference_mode():
        encoded = [pipe.encode_prompt(text, torch.device("cpu"), 1, True, negative_prompt=scene.negative_prompt)
                   for pipe, text in zip(pipes, texts)]

        def model_output(p, x, t):
            cond, uncond = encoded[p]
            return guided(unet_output(p, x, t, uncond, False), unet_output(p, x, t, cond, True), scene.guidance_scale)

        schedule = DiffusionSchedule(make_scheduler("ddim", pipes[0].scheduler.config))
        schedule.set_timesteps(scene.steps)
        noise = torch.randn((1, 4, *scene.latent_hw), generator=seed_generator(seed))
        return reference_multidiffusion(model_output, noise, schedule, scene_weights(scene))
