"""FLUX.2 klein (distilled and base) on tiny random klein-shaped models (issue 22): diffusers' Flux2KleinPipeline,
drawing its noise from the seed's CPU generator, is the oracle for plain scenes; the shared reference loop, each
prompt's velocity computed as the pipeline computes it (its encode_prompt, its own packing and position ids), is
the oracle for regions and panoramas. klein's latent space is patchified and normalised per patch channel by the
VAE's batch-norm statistics: multidiff keeps the canvas in that form (one cell a 2x2 patch, 16 px), so no view
or mask can cut a patch; the tests check the codec against the pipeline's own normalisation and that views
start on whole patches. Then samples per step, the empirical shift of a view, loading, LoRAs, refusals."""
from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from multidiff_cli.catalog import FLUX2, detect_family, detect_few_step, family_of_folder
from multidiff_cli.method.schedule import FlowSchedule
from multidiff_cli.models.flux2 import PatchCodec, empirical_mu, patchify, unpatchify
from multidiff_cli.models.loading import load_model
from multidiff_cli.models.random_flux import build_tiny_klein_random
from multidiff_cli.models.random_weights import save_model
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import plan_render, render, scene_weights
from reference import reference_multidiffusion, samples_per_step, scene_of, seed_generator

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def klein():
    """tiny-flux2-klein-random: distilled (4 steps, no guidance by default), native window 256 px."""
    return build_tiny_klein_random()


@pytest.fixture(scope="module")
def base():
    """tiny-flux2-klein-base-random: the same weights as a base model (CFG)."""
    return build_tiny_klein_random(distilled=False)


@pytest.fixture(scope="module")
def small_window():
    """Base-model weights with a 64 px native window (4 patch cells): views on small canvases."""
    model = build_tiny_klein_random(native_px=64, distilled=False)
    assert model.native_cells == 4
    return model


def klein_pipeline(model, distilled: bool):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = diffusers.Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
                                        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                        transformer=model.transformer, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def transformer_calls(model):
    calls: list[tuple[float, int]] = []

    def record(module, args, kwargs):
        calls.append((float(kwargs["timestep"][0]), kwargs["hidden_states"].shape[0]))

    handle = model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --- no regions: Flux2KleinPipeline from the same noise --------------------------------------------------------

PLAIN = "prompt: a red sofa in a room\nwidth: 96\nheight: 64\nseed: 9\n"


@pytest.mark.parametrize("variant, extra, steps, guidance", [
    ("klein", "", 4, 1.0),  # the distilled model's defaults: 4 steps, one sample per prompt
    ("base", "steps: 3\nguidance_scale: 4.0\n", 3, 4.0),
], ids=["distilled", "base-cfg"])
def test_a_plain_scene_equals_diffusers_flux2_klein_pipeline_from_the_seed_s_noise(request, write_scene, variant,
                                                                                   extra, steps, guidance,
                                                                                   assert_close_batched):
    """The pipeline draws randn((1, 128, H/16, W/16)), the patchified canvas multidiff samples on: the same
    numbers from the seed's generator. Its latent output is unpatchified and denormalised: the codec's
    to_latents takes it back to the canvas. Pictures within one 8-bit level."""
    model = request.getfixturevalue(variant)
    scene = scene_of(write_scene, model, PLAIN + extra + "few_step: false\n")
    assert (scene.steps, scene.guidance_scale) == (steps, guidance)
    ours = render(scene, model, seed=9)
    pipe = klein_pipeline(model, distilled=variant == "klein")
    with torch.inference_mode():
        theirs = pipe(prompt="a red sofa in a room", height=64, width=96, num_inference_steps=steps,
                      guidance_scale=guidance, generator=seed_generator(9), output_type="latent").images
        picture = pipe.image_processor.postprocess(pipe.vae.decode(theirs, return_dict=False)[0], output_type="pil")[0]
    assert ours.latents.shape == (1, 128, 4, 6)
    assert_close_batched(ours.latents, PatchCodec(model.vae, 16).to_latents(theirs), guidance=guidance, steps=steps)
    assert np.abs(np.asarray(ours.image).astype(int) - np.asarray(picture).astype(int)).max() <= 1


def test_the_codec_normalises_each_patch_channel_as_the_pipeline_does(klein):
    """Encoding is the pipeline's _encode_vae_image (the mean, patchified, minus each of the 128 channels' running
    mean over its std); decoding inverts it exactly, and the statistics are not the identity."""
    pixels = torch.rand((1, 3, 64, 96), generator=seed_generator(1)) * 2 - 1
    codec = klein.codec
    pipe = klein_pipeline(klein, distilled=True)
    with torch.inference_mode():
        theirs = pipe._encode_vae_image(pixels, generator=seed_generator(0))
    ours = codec.encode(pixels)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    x = torch.randn((1, 128, 4, 6), generator=seed_generator(2))
    torch.testing.assert_close(codec.to_latents(codec.from_latents(x)), x, rtol=0, atol=1e-5)
    assert codec.from_latents(x).shape == (1, 32, 8, 12)
    torch.testing.assert_close(unpatchify(patchify(x[:, :32].repeat(1, 1, 2, 2))), x[:, :32].repeat(1, 1, 2, 2))
    assert klein.vae.bn.running_var.std() > 0.1


# --- regions and panoramas: the shared reference loop ---------------------------------------------------------


def background_latents(model, generator: torch.Generator, steps: int, regions: int) -> torch.Tensor:
    """The authors' bootstrapping backgrounds (a flat random colour per step and region), encoded as
    Flux2KleinPipeline encodes pictures (its _encode_vae_image: patchified, normalised)."""
    colours = torch.rand((steps * regions, 3, 1, 1), generator=generator) * 2 - 1
    pipe = klein_pipeline(model, distilled=True)
    with torch.inference_mode():
        latents = pipe._encode_vae_image(colours.expand(-1, -1, 64, 64), generator=None)
    return latents.mean(dim=(2, 3), keepdim=True).reshape(steps, regions, -1, 1, 1)


def klein_reference(model, scene, seed: int, views=None, pipes=None, distilled: bool = False) -> torch.Tensor:
    """The paper's loop on klein (tests/reference.py): every prompt encoded by Flux2KleinPipeline.encode_prompt,
    its velocity on each view's crop as the pipeline computes it (_pack_latents, _prepare_latent_ids, the text
    ids, timestep t/1000, guided over the negative prompt), its own Euler step on the pipeline's schedule for a
    picture of one view's size, then the weighted mean."""
    pipe = klein_pipeline(model, distilled)
    pipes = pipes or [pipe] * (1 + len(scene.regions))
    h, w = scene.latent_hw
    generator = seed_generator(seed)
    noise = torch.randn((1, 128, h, w), generator=generator)
    backgrounds = (background_latents(model, generator, scene.bootstrap_steps, len(scene.regions))
                   if scene.bootstrap_steps else None)
    view_h, view_w = (views[0].height, views[0].width) if views else (h, w)
    schedule = FlowSchedule(pipe.scheduler)
    schedule.set_timesteps(scene.steps, sigmas=np.linspace(1.0, 1 / scene.steps, scene.steps),
                           mu=empirical_mu(view_h * view_w, scene.steps))
    prompts = [(scene.prompt, scene.guidance_scale)] + [
        (r.prompt, scene.guidance_scale if r.guidance_scale is None else r.guidance_scale) for r in scene.regions]
    with torch.inference_mode():
        encoded = [p.encode_prompt(text, device=CPU) for p, (text, _) in zip(pipes, prompts)]
        negative = pipe.encode_prompt(scene.negative_prompt, device=CPU)

        def velocity(p, x, t):
            vh, vw = x.shape[-2:]
            packed, ids = pipe._pack_latents(x), pipe._prepare_latent_ids(x)

            def transformer(embeds, text_ids):
                out = pipes[p].transformer(hidden_states=packed, timestep=t.expand(1) / 1000, guidance=None,
                                           encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                           return_dict=False)[0]
                return pipe._unpack_latents_with_ids(out, ids, vh, vw)

            v = transformer(*encoded[p])
            if prompts[p][1] > 1:
                u = transformer(*negative)
                v = u + prompts[p][1] * (v - u)
            return v

        return reference_multidiffusion(velocity, noise, schedule, scene_weights(scene), views=views,
                                        bootstrap_steps=scene.bootstrap_steps, backgrounds=backgrounds)


REGIONS = """
prompt: a living room
negative_prompt: blurry
width: {width}
height: 64
steps: 2
bootstrap_steps: 1
guidance_scale: 4.0
seed: 11
{extra}regions:
  - prompt: a red sofa
    box: [0, 16, 48, 64]
    guidance_scale: 2.0
  - prompt: a lamp
    mask: masks/lamp.png
"""


def test_boxes_a_mask_and_region_guidance_equal_the_reference_loop(base, write_scene, lamp_mask, assert_close_batched):
    lamp_mask(96, 64)
    scene = scene_of(write_scene, base, REGIONS.format(width=96, extra=""))
    assert len(plan_render(scene, base).views) == 1
    ours = render(scene, base, seed=11).latents
    assert_close_batched(ours, klein_reference(base, scene, 11), guidance=4.0, steps=2)


@pytest.mark.parametrize("wrap", ["none", "horizontal"])
def test_a_canvas_wider_than_the_native_window_equals_the_reference_loop_over_views(small_window, write_scene,
                                                                                   lamp_mask, wrap,
                                                                                   assert_close_batched):
    """160 px wide in 64 px views at a 32 px stride: every view starts on a whole patch (a canvas cell is one),
    with position ids of a picture of its own size."""
    lamp_mask(160, 64)
    scene = scene_of(write_scene, small_window, REGIONS.format(width=160, extra=f"view_stride: 32\nwrap: {wrap}\n"))
    views = plan_render(scene, small_window).views
    assert [(v.left, v.width) for v in views][:3] == [(0, 4), (2, 4), (4, 4)]
    ours = render(scene, small_window, seed=11).latents
    assert_close_batched(ours, klein_reference(small_window, scene, 11, views), guidance=4.0, steps=2)


@pytest.mark.parametrize("stride", [8, 24])
def test_a_view_that_would_cut_a_patch_is_refused(small_window, write_scene, stride):
    """A view offset by one 8 px cell would split klein's 2x2 patches (each normalised on its own): view_stride
    must be a whole number of patches, 16 px, and says so at its line."""
    from multidiff_cli.errors import SceneError

    with pytest.raises(SceneError, match="view_stride"):
        scene_of(write_scene, small_window, f"prompt: p\nwidth: 160\nheight: 64\nview_stride: {stride}\n")


def test_the_shift_is_the_empirical_mu_of_a_view_and_the_steps(small_window, write_scene):
    """A 256x64 canvas in 64 px views runs the pipeline's timesteps for a 64x64 picture, not for 256x64."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    def pipeline_timesteps(tokens):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(small_window.scheduler_config)
        timesteps, _ = retrieve_timesteps(scheduler, 3, CPU, sigmas=np.linspace(1.0, 1 / 3, 3),
                                          mu=compute_empirical_mu(tokens, 3))
        return timesteps / 1000

    assert empirical_mu(4096, 28) == compute_empirical_mu(4096, 28)
    assert empirical_mu(5000, 4) == compute_empirical_mu(5000, 4)
    scene = scene_of(write_scene, small_window, "prompt: fjords\nwidth: 256\nheight: 64\nsteps: 3\nguidance_scale: 1\n")
    with transformer_calls(small_window) as calls:
        render(scene, small_window, seed=0)
    seen = torch.tensor(list(dict.fromkeys(timestep for timestep, _ in calls)))
    torch.testing.assert_close(seen, pipeline_timesteps(16).float(), rtol=1e-6, atol=0)
    assert not torch.allclose(seen, pipeline_timesteps(64).float(), rtol=1e-4, atol=0)


# --- samples per step ------------------------------------------------------------------------------------------

COUNTED = """
prompt: a street
width: 96
height: 64
steps: 2
bootstrap_steps: 0
max_batch: 64
few_step: false
{extra}regions:
  - prompt: a woman
    box: [0, 0, 32, 64]
  - prompt: a man
    box: [64, 0, 96, 64]
"""


@pytest.mark.parametrize("variant, extra, per_step", [
    ("klein", "", [2 + 1] * 2),  # distilled: one sample per prompt
    ("base", "guidance_scale: 4.0\n", [2 + 2] * 2),  # CFG: the unconditional sample shared
], ids=["distilled", "base-cfg"])
def test_samples_per_step(request, write_scene, variant, extra, per_step):
    model = request.getfixturevalue(variant)
    scene = scene_of(write_scene, model, COUNTED.format(extra=extra))
    with transformer_calls(model) as calls:
        render(scene, model, seed=0)
    assert samples_per_step(calls) == per_step


# --- loading, records, the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_folder(klein, tmp_path_factory):
    """tiny-flux2-klein-random saved as a diffusers folder whose name says nothing, with the model_index.json
    Flux2KleinPipeline writes for a distilled model (is_distilled: true)."""
    folder = tmp_path_factory.mktemp("models") / "some-model"
    save_model(klein, folder)
    index = {"_class_name": "Flux2KleinPipeline", "is_distilled": True,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_klein_folder_is_told_by_its_model_index_and_renders_as_the_built_model(klein, klein_folder, write_scene):
    assert family_of_folder(klein_folder) is FLUX2 and detect_family(str(klein_folder)) is FLUX2
    assert detect_few_step(str(klein_folder))  # is_distilled, though its name says nothing
    assert detect_few_step("black-forest-labs/FLUX.2-klein-4B") and not detect_few_step(
        "black-forest-labs/FLUX.2-klein-base-4B")
    loaded = load_model(str(klein_folder), CPU, torch.float32)
    assert loaded.family == "flux2" and loaded.few_step_model
    scene = scene_of(write_scene, klein, "prompt: p\nwidth: 64\nheight: 64\nsteps: 2\nregions:\n"
                                         "  - prompt: q\n    box: [0, 0, 32, 64]\n")
    torch.testing.assert_close(render(scene, loaded, seed=3).latents, render(scene, klein, seed=3).latents,
                               rtol=0, atol=1e-6)


def test_the_cli_renders_a_klein_scene_and_records_the_family(cli, write_scene, tmp_path):
    scene = write_scene("prompt: a harbour\nwidth: 64\nheight: 64\nregions:\n  - prompt: a boat\n"
                        "    box: [0, 32, 64, 64]\n")
    result = cli("render", scene, "--model", "tiny-flux2-klein-random", "-q", "-o", tmp_path / "k.png")
    assert result.exit_code == 0, result.output
    record = read_metadata(tmp_path / "k.png")
    assert record["family"] == "flux2" and (record["scene"]["steps"], record["scene"]["guidance_scale"]) == (4, 1.0)
    with Image.open(tmp_path / "k.png") as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize("text, said", [
    ("prompt: p\nwidth: 72\nheight: 64\n", "width: must be a multiple of 16"),
    ("prompt: p\nwidth: 64\nheight: 64\nscheduler: ddim\n", "scheduler"),
], ids=["8-not-16", "ddpm-scheduler"])
def test_what_klein_refuses_is_one_line_and_nothing_written(cli, write_scene, tmp_path, text, said):
    result = cli("render", write_scene(text), "--model", "tiny-flux2-klein-random", "-q", "-o", tmp_path / "k.png")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert said in line and not (tmp_path / "k.png").exists()


# --- LoRAs ------------------------------------------------------------------------------------------------------

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj")


def peft_lora(model, path, seed: int, rank: int = 2, strength: float = 0.4):
    """A LoRA file in the diffusers/peft layout with random factors on the transformer's attention projections
    (klein's LoRAs adapt the transformer only)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in sorted(model.transformer.named_modules()):
        if isinstance(linear, torch.nn.Linear) and name.endswith(TARGETS):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn((rank, linear.in_features),
                                                                       generator=generator) * strength
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn((linear.out_features, rank),
                                                                       generator=generator) * strength
    assert len(tensors) == 2 * 5
    save_file(tensors, str(path))
    return path


def test_a_scene_lora_renders_as_diffusers_klein_pipeline_with_that_lora(klein, write_scene, tmp_path,
                                                                         assert_close_batched):
    (tmp_path / "loras").mkdir()
    style = peft_lora(klein, tmp_path / "loras" / "style.safetensors", seed=1)
    scene = scene_of(write_scene, klein, PLAIN + "steps: 3\nfew_step: false\nloras:\n"
                                                 "  - path: loras/style.safetensors\n    scale: 0.7\n")
    ours = render(scene, copy.deepcopy(klein), seed=9).latents
    pipe = klein_pipeline(copy.deepcopy(klein), distilled=True)
    pipe.load_lora_weights(str(style), adapter_name="lora")
    pipe.set_adapters(["lora"], [0.7])
    with torch.inference_mode():
        theirs = pipe(prompt="a red sofa in a room", height=64, width=96, num_inference_steps=3,
                      generator=seed_generator(9), output_type="latent").images
    theirs = PatchCodec(klein.vae, 16).to_latents(theirs)
    bare = render(scene.model_copy(update={"loras": []}), klein, seed=9).latents
    assert (bare - theirs).abs().max() > 100 * (ours - theirs).abs().max()  # the LoRA matters
    assert_close_batched(ours, theirs, steps=3)


def test_a_region_lora_is_exactly_separated(base, write_scene, tmp_path, assert_close_batched):
    (tmp_path / "loras").mkdir()
    alice = peft_lora(base, tmp_path / "loras" / "alice.safetensors", seed=2)
    scene = scene_of(write_scene, base, """
prompt: a street
negative_prompt: blurry
width: 96
height: 64
steps: 2
bootstrap_steps: 0
guidance_scale: 3.0
regions:
  - prompt: a woman with red hair
    box: [0, 0, 48, 64]
    loras:
      - path: loras/alice.safetensors
        scale: 0.9
  - prompt: a man
    box: [48, 0, 96, 64]
""")
    ours = render(scene, copy.deepcopy(base), seed=5).latents
    bare, with_alice = klein_pipeline(base, False), klein_pipeline(copy.deepcopy(base), False)
    with_alice.load_lora_weights(str(alice), adapter_name="alice")
    with_alice.set_adapters(["alice"], [0.9])
    expected = klein_reference(base, scene, 5, pipes=[bare, with_alice, bare])
    everywhere = klein_reference(base, scene, 5, pipes=[with_alice] * 3)
    assert_close_batched(ours, expected, guidance=3.0, steps=2)
    assert (everywhere - expected).abs().max() > 100 * (ours - expected).abs().max()


def bfl_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flux2Transformer2DModel's weights in Black Forest Labs' layout (flux-2-klein-4b.safetensors): the inverse of
    diffusers' convert_flux2_transformer_checkpoint_to_diffusers (q, k, v fused, norms as `.scale`, the final
    modulation's shift and scale swapped back)."""
    renames = {"x_embedder": "img_in", "context_embedder": "txt_in",
               "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
               "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
               "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear"}
    double = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
              "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
              "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
              "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0",
              "ff_context.linear_out": "txt_mlp.2"}
    single = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
              "attn.norm_k": "norm.key_norm"}
    s, out = dict(state), {}
    for key in sorted(s):
        if key not in s:
            continue
        name, param = key.rsplit(".", 1)
        if key.startswith("transformer_blocks."):
            _, index, inner = name.split(".", 2)
            if inner in ("attn.to_q", "attn.add_q_proj"):
                stream, parts = ("img", ("to_q", "to_k", "to_v")) if inner == "attn.to_q" else (
                    "txt", ("add_q_proj", "add_k_proj", "add_v_proj"))
                out[f"double_blocks.{index}.{stream}_attn.qkv.{param}"] = torch.cat(
                    [s.pop(f"transformer_blocks.{index}.attn.{part}.{param}") for part in parts])
            elif inner in double:
                norm = "norm" in inner and "norm_" in inner
                out[f"double_blocks.{index}.{double[inner]}.{'scale' if norm else param}"] = s.pop(key)
            continue
        if key.startswith("single_transformer_blocks."):
            _, index, inner = name.split(".", 2)
            norm = inner.startswith("attn.norm_")
            out[f"single_blocks.{index}.{single[inner]}.{'scale' if norm else param}"] = s.pop(key)
            continue
        if name == "norm_out.linear":
            scale, shift = s.pop(key).chunk(2)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
            continue
        out[f"{renames[name]}.{param}"] = s.pop(key)
    left = [k for k in s if not k.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert not left, left
    return {key: value.contiguous() for key, value in out.items()}


def test_a_bfl_single_file_loads_with_model_config_and_renders_as_its_folder(klein, klein_folder, write_scene,
                                                                           tmp_path):
    """Flux2KleinPipeline reads no single file: the transformer comes from the file (diffusers' FLUX.2 conversion),
    the other parts from model_config; the file is told from FLUX.2 [dev] by its text input's width."""
    from multidiff_cli.catalog import family_of_checkpoint

    single = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file(bfl_layout(klein.transformer.state_dict()), str(single))
    assert family_of_checkpoint(single) is FLUX2
    loaded = load_model(str(single), CPU, torch.float32, config=str(klein_folder))
    assert loaded.family == "flux2"
    scene = scene_of(write_scene, klein, "prompt: p\nwidth: 64\nheight: 64\nsteps: 2\n")
    torch.testing.assert_close(render(scene, loaded, seed=3).latents, render(scene, klein, seed=3).latents,
                               rtol=0, atol=1e-6)
    from multidiff_cli.errors import MultidiffError

    with pytest.raises(MultidiffError, match="reads no single file itself: set model_config"):  # one line, what it needs
        load_model(str(single), CPU, torch.float32)


def test_a_flux2_dev_file_is_told_from_klein_and_refused_in_one_line(tmp_path):
    """FLUX.2 [dev] shares klein's keys but reads Mistral's 15360-wide hidden states: no family multidiff renders."""
    from multidiff_cli.catalog import family_of_checkpoint
    from multidiff_cli.errors import ModelError

    dev = tmp_path / "flux2-dev.safetensors"
    save_file({"single_stream_modulation.lin.weight": torch.zeros(1, 1), "txt_in.weight": torch.zeros(1, 15360)},
              str(dev))
    assert family_of_checkpoint(dev) is None
    with pytest.raises(ModelError, match=r"its keys are FLUX.2 \[dev\]'s"):
        load_model(str(dev), CPU, torch.float32)


def test_a_picture_to_start_from_and_a_keep_mask_work_on_the_patch_canvas(base, write_scene, tmp_path):
    """klein has no img2img pipeline in diffusers to compare with (its `image` is a reference, not a start): the
    flow formula's start is checked through the steps run (strength 0.6 of 4: 3), and `keep` through the kept
    16 px cells, which end as the picture's own patch-normalised latents."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 0, 48, 32))
    mask.save(tmp_path / "keep.png")
    scene = scene_of(write_scene, base, "prompt: a harbour\ninit_image: pic.png\nwidth: 64\nheight: 64\nsteps: 4\n"
                                        "strength: 0.6\nguidance_scale: 2.0\nseed: 4\nkeep: keep.png\n")
    with transformer_calls(base) as calls:
        ours = render(scene, base, seed=4).latents
    assert len(samples_per_step(calls)) == 3
    clean = base.codec.encode(torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    kept = torch.ones(4, 4, dtype=torch.bool)
    kept[0:2, 1:3] = False
    torch.testing.assert_close(ours[0][:, kept], clean[0][:, kept], atol=1e-5, rtol=0)
    assert (ours[0][:, ~kept] - clean[0][:, ~kept]).abs().max() > 1e-2
