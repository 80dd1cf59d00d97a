"""The render path on the tiny random model: guidance batching, prompt table, determinism."""
from __future__ import annotations

import pytest
import torch

from multidiff_cli.errors import RenderError
from multidiff_cli.method.guidance import guided_denoiser
from multidiff_cli.method.schedule import DiffusionSchedule
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.run.render import render, scene_prompts, scene_weights
from multidiff_cli.scene import load_scene
from reference import guided, reference_multidiffusion

SCENE = """
prompt: a living room
negative_prompt: blurry
style: oil painting
width: 128
height: 96
steps: {steps}
bootstrap_steps: {bootstrap}
regions:
  - prompt: a red sofa
    box: [0, 32, 64, 96]
  - prompt: a plant
    box: [80, 0, 128, 48]
    negative_prompt: leaves
    guidance_scale: 1.0
  - prompt: a red sofa
    box: [64, 64, 128, 96]
    guidance_scale: 3.0
"""


@pytest.fixture
def scene(write_scene):
    return load_scene(write_scene(SCENE.format(steps=4, bootstrap=2)))


def test_prompt_table_lists_each_text_once(scene):
    prompts = scene_prompts(scene)
    assert prompts.texts == [
        "a living room, oil painting", "blurry", "a red sofa, oil painting", "a plant, oil painting", "leaves",
    ]
    assert prompts.cond == [0, 2, 3, 2]
    assert prompts.negative == [1, 1, 4, 1]
    assert prompts.guidance == [7.5, 7.5, 1.0, 3.0]


def requests_for(x):
    """One input shared by every prompt, or one input per prompt (bootstrapping)."""
    return [(0 if x.shape[0] == 1 else p, p) for p in range(4)]


def plain_guidance(unet, embeddings, prompts, x, t):
    """Unbatched classifier-free guidance, one prompt at a time: the oracle for the batched denoiser."""
    out = []
    for p, (c, n, g) in enumerate(zip(prompts.cond, prompts.negative, prompts.guidance)):
        xp = x[p : p + 1] if x.shape[0] > 1 else x
        cond = unet(xp, t, encoder_hidden_states=embeddings[c : c + 1]).sample
        if g > 1:
            uncond = unet(xp, t, encoder_hidden_states=embeddings[n : n + 1]).sample
            cond = uncond + g * (cond - uncond)
        out.append(cond[0])
    return torch.stack(out)


@pytest.mark.parametrize("inputs", [1, 4], ids=["shared-latent", "bootstrap-latents"])
def test_batched_guidance_equals_plain_per_prompt_guidance(tiny, scene, inputs, unet_doubles, assert_close_batched):
    prompts = scene_prompts(scene)
    embeddings = tiny.encode_prompts(prompts.texts, (512, 512)).get("hidden_states")
    x = torch.randn((inputs, 4, 12, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    counting = unet_doubles.Counting(tiny.unet)
    with torch.inference_mode():
        batched = guided_denoiser(unet_doubles.run(counting), embeddings, prompts)(x, t, requests_for(x))
        expected = plain_guidance(tiny.unet, embeddings, prompts, x, t)
    assert_close_batched(batched, expected, guidance=max(prompts.guidance))
    # shared latent: 3 distinct cond texts + 1 shared "blurry" uncond (the plant runs none: guidance 1)
    # bootstrap: every prompt its own input -> 4 cond + 3 uncond
    assert counting.sizes == [4 if inputs == 1 else 7]  # one UNet call for the whole step


def test_texts_are_encoded_as_the_sd_pipeline_does(tiny, assert_close_batched):
    emb = tiny.encode_prompts(["a red sofa", ""], (512, 512)).get("hidden_states")
    assert emb.shape == (2, 77, tiny.text_encoder.config.hidden_size)
    ids = tiny.tokenizer(["a red sofa"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert_close_batched(emb[:1], tiny.text_encoder(ids)[0])  # a batch of two against one text alone


def test_background_latents_are_flat_one_per_step_and_region(tiny):
    gen = torch.Generator().manual_seed(0)
    backgrounds = tiny.codec.background_latents(gen, steps=3, regions=2)
    assert backgrounds.shape == (3, 2, 4, 1, 1)
    assert len({tuple(b.flatten().tolist()) for b in backgrounds.reshape(6, 4)}) == 6  # different colours


def test_same_seed_same_picture_other_seed_other_picture(tiny, scene):
    first = render(scene, tiny, seed=11)
    again = render(scene, tiny, seed=11)
    other = render(scene, tiny, seed=12)
    assert first.image.size == (128, 96)
    assert torch.equal(first.latents, again.latents)
    assert first.image.tobytes() == again.image.tobytes()
    assert not torch.equal(first.latents, other.latents)


@pytest.mark.parametrize("bootstrap", [0, 4], ids=["no-step", "every-step"])
def test_bootstrap_zero_and_all_steps_equal_the_reference_loop(tiny, write_scene, monkeypatch, unet_doubles, bootstrap,
                                                               assert_close_batched):
    """bootstrap_steps 0 is the plain loop (one latent shared by every prompt: 4 samples a step); bootstrap_steps
    = steps bootstraps every step (every prompt its own latent: 4 conditional + 3 unconditional samples a step);
    both give the latents of the reference loop, started from render's noise and backgrounds."""
    scene = load_scene(write_scene(SCENE.format(steps=4, bootstrap=bootstrap)))
    unet = tiny.unet
    counting = unet_doubles.Counting(unet)
    monkeypatch.setattr(tiny, "unet", counting)
    ours = render(scene, tiny, seed=0).latents
    assert counting.samples == 4 * (7 if bootstrap else 4)

    from diffusers import StableDiffusionPipeline

    prompts = scene_prompts(scene)
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=make_scheduler("ddim", tiny.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    generator = torch.Generator("cpu").manual_seed(0)  # render's draws: the noise, then the backgrounds
    noise = torch.randn((1, 4, 12, 16), generator=generator)
    backgrounds = tiny.codec.background_latents(generator, bootstrap, 3) if bootstrap else None
    schedule = DiffusionSchedule(make_scheduler("ddim", tiny.scheduler_config))
    schedule.set_timesteps(4)
    with torch.inference_mode():
        encoded = [pipe.encode_prompt(prompts.texts[c], torch.device("cpu"), 1, True, negative_prompt=prompts.texts[n])
                   for c, n in zip(prompts.cond, prompts.negative)]

        def model_output(p, x, t):
            cond, uncond = encoded[p]
            return guided(unet(x, t, encoder_hidden_states=uncond).sample, unet(x, t, encoder_hidden_states=cond).sample,
                          prompts.guidance[p])

        reference = reference_multidiffusion(model_output, noise, schedule, scene_weights(scene),
                                             bootstrap_steps=bootstrap, backgrounds=backgrounds)
    assert_close_batched(ours, reference, guidance=7.5, steps=4)


def test_bootstrapping_changes_the_picture(tiny, write_scene):
    plain = render(load_scene(write_scene(SCENE.format(steps=4, bootstrap=0))), tiny, seed=3)
    booted = render(load_scene(write_scene(SCENE.format(steps=4, bootstrap=2))), tiny, seed=3)
    assert not torch.equal(plain.latents, booted.latents)


def test_max_batch_splits_calls_without_changing_the_result(tiny, scene, unet_doubles, assert_close_batched):
    prompts = scene_prompts(scene)
    embeddings = tiny.encode_prompts(prompts.texts, (512, 512)).get("hidden_states")
    x = torch.randn((4, 4, 12, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor(300)
    with torch.inference_mode():
        whole = guided_denoiser(unet_doubles.run(tiny.unet), embeddings, prompts)(x, t, requests_for(x))
        counting = unet_doubles.Counting(tiny.unet)
        split = guided_denoiser(unet_doubles.run(counting, samples_per_call=3), embeddings, prompts)(x, t, requests_for(x))
    assert counting.sizes == [3, 2, 2]  # 7 samples in the fewest calls of at most 3, as even as can be
    assert_close_batched(split, whole, guidance=max(prompts.guidance))


@pytest.mark.parametrize("samples_per_call", [6, None], ids=["max-batch-6", "default-max-batch"])
def test_out_of_memory_halves_the_batch_once_with_a_warning(tiny, scene, unet_doubles, assert_close_batched,
                                                            samples_per_call):
    prompts = scene_prompts(scene)
    embeddings = tiny.encode_prompts(prompts.texts, (512, 512)).get("hidden_states")
    x = torch.randn((4, 4, 12, 16), generator=torch.Generator().manual_seed(1))
    warnings = []
    flaky = unet_doubles.OutOfMemory(tiny.unet, limit=3)
    unet = unet_doubles.run(flaky, samples_per_call, warn=warnings.append)
    first_call = 4 if samples_per_call == 6 else 7  # the step's 7 samples: calls of 4 and 3, or one of 7
    with torch.inference_mode():
        out = guided_denoiser(unet, embeddings, prompts)(x, torch.tensor(300), requests_for(x))
        expected = guided_denoiser(unet_doubles.run(tiny.unet), embeddings, prompts)(x, torch.tensor(300), requests_for(x))
    assert_close_batched(out, expected, guidance=max(prompts.guidance))
    halved = first_call // 2
    assert unet.samples_per_call == halved and flaky.sizes == {2: [2, 2, 2, 1], 3: [3, 2, 2]}[halved]
    assert warnings == [f"out of GPU memory at {first_call} UNet samples per call: retrying with --max-batch {halved}"]
    flaky.limit = 1  # a second shortage in the same render is not retried
    with pytest.raises(torch.cuda.OutOfMemoryError), torch.inference_mode():
        guided_denoiser(unet, embeddings, prompts)(x, torch.tensor(300), requests_for(x))


def test_render_turns_a_lasting_out_of_memory_into_advice(tiny, scene, monkeypatch, unet_doubles):
    monkeypatch.setattr(tiny, "unet", unet_doubles.OutOfMemory(tiny.unet, limit=0))
    with pytest.raises(RenderError, match="--max-batch 1"):
        render(scene, tiny, seed=0)


def test_nan_latents_stop_the_render_at_the_step_they_appear(tiny, scene, monkeypatch, unet_doubles):
    monkeypatch.setattr(tiny, "unet", unet_doubles.NaN(tiny.unet, good_calls=1))  # one UNet call a step
    steps = []
    with pytest.raises(RenderError, match=r"NaN or inf values from step 2 of 4 \(float32 on cpu\)"):
        render(scene, tiny, seed=0, callback=lambda i, n, *_: steps.append(i))
    assert steps == [0]  # the caller never saw the broken step
