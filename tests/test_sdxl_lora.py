"""LoRAs on SDXL, on a tiny random SDXL-shaped model: the UNet's and both text encoders' halves load
(diffusers/peft keys, kohya keys with diffusers' block names, kohya keys with Stability's block names),
a scene LoRA renders as diffusers' StableDiffusionXLPipeline with that LoRA, and a region's LoRA
equals a per-prompt loop with the LoRA on that prompt alone."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from multidiff_cli.errors import LoraError
from multidiff_cli.method.schedule import DiffusionSchedule
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.models.device import quiet_libraries
from multidiff_cli.models.adapters import _tuner_layers, load_loras
from multidiff_cli.models.random_weights import build_tiny_sdxl_random
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import render, scene_weights
from multidiff_cli.scene import load_scene
from reference import guided, reference_multidiffusion

CPU = torch.device("cpu")
UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
PARTS = (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS))
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
LAYOUTS = ["peft", "kohya", "kohya-sgm"]


def fresh_xl():
    """A tiny SDXL of its own (LoRAs get loaded into it), the same weights every time."""
    quiet_libraries()
    return build_tiny_sdxl_random(sample_size=16).to(CPU, torch.float32)


def lora_layers(components, parts=("unet", "text_encoder", "text_encoder_2"), rank=2, seed=0, strength=0.3):
    """Random LoRA factors (part, module name, down (r, in), up (out, r)) on every attention projection."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for part, suffixes in PARTS:
        if part not in parts:
            continue
        for name, linear in sorted(getattr(components, part).named_modules()):
            if isinstance(linear, torch.nn.Linear) and name.endswith(suffixes):
                down = torch.randn((rank, linear.in_features), generator=generator) * strength
                up = torch.randn((linear.out_features, rank), generator=generator) * strength
                layers.append((part, name, down, up))
    return layers


def write_lora(path, layers, layout: str, sgm_name=None):
    """peft: `<part>.<module>.lora_A.weight`; kohya: `lora_unet_/lora_te1_/lora_te2_<module_underscored>`
    with .lora_down/.lora_up/.alpha (alpha = rank/2, up doubled: the same update); kohya-sgm: kohya
    with the UNet's blocks in SGM numbering (`sgm_name`: a UNet module name -> its SGM one). Text-encoder layers are named as LoRA files in the wild
    name them (`text_model.encoder.layers...`, `lora_te1_text_model_encoder_layers_...`)."""
    tensors = {}
    for part, name, down, up in layers:
        if part != "unet" and not name.startswith("text_model."):
            name = "text_model." + name  # files name CLIP's layers as transformers 4 did (5 dropped text_model.)
        if layout == "peft":
            tensors[f"{part}.{name}.lora_A.weight"] = down.contiguous()
            tensors[f"{part}.{name}.lora_B.weight"] = up.contiguous()
            continue
        module = sgm_name(name) if layout == "kohya-sgm" and part == "unet" else name
        key = KOHYA_PREFIX[part] + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = (up * 2).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(down.shape[0] / 2)
    save_file(tensors, str(path))
    return path


def xl_pipeline(components, scheduler_name="ddim"):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
        scheduler=make_scheduler(scheduler_name, components.scheduler_config), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


@pytest.fixture
def lora_file(tmp_path, ldm_unet_key):
    """lora_file(layout, parts, seed) -> a LoRA file for the tiny SDXL under tmp_path/loras."""

    def make(layout="peft", parts=("unet", "text_encoder", "text_encoder_2"), seed=1, name="style"):
        (tmp_path / "loras").mkdir(exist_ok=True)
        xl = fresh_xl()
        return write_lora(tmp_path / "loras" / f"{name}_{layout}.safetensors", lora_layers(xl, parts, seed=seed),
                          layout, sgm_name=lambda module: ldm_unet_key(module, xl.unet.config))

    return make


@pytest.mark.parametrize("negative", ["", "blurry"], ids=["zeros", "negative"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_scene_lora_renders_as_diffusers_sdxl_pipeline_with_that_lora(lora_file, write_scene, layout, negative,
                                                                        assert_close_batched):
    style = lora_file(layout)
    scene = load_scene(write_scene(
        f"prompt: a portrait\nnegative_prompt: '{negative}'\nwidth: 96\nheight: 64\nsteps: 2\nguidance_scale: 5.0\n"
        f"seed: 5\nloras:\n  - path: loras/{style.name}\n    scale: 0.6\n"
    ))
    ours = render(scene, fresh_xl(), seed=5).latents

    pipe = xl_pipeline(fresh_xl())
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["style"], [0.6])
    noise = torch.randn((1, 4, 8, 12), generator=torch.Generator("cpu").manual_seed(5))
    with torch.inference_mode():
        theirs = pipe("a portrait", negative_prompt=negative or None, height=64, width=96, num_inference_steps=2,
                      guidance_scale=5.0, latents=noise, output_type="latent").images
    bare = render(scene.model_copy(update={"loras": []}), fresh_xl(), seed=5).latents
    assert (bare - theirs).abs().max() > 100 * (ours - theirs).abs().max()  # the LoRA matters
    assert_close_batched(ours, theirs, guidance=5.0, steps=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layer_of_each_half_loads_the_second_text_encoder_s_too(lora_file, layout):
    style = lora_file(layout)
    model = fresh_xl()
    wanted = {part: sum(1 for name, m in getattr(model, part).named_modules()
                        if isinstance(m, torch.nn.Linear) and name.endswith(suffixes)) for part, suffixes in PARTS}
    load_loras(model, [style])
    for part, _ in PARTS:
        assert len(_tuner_layers(model, (part,))) == wanted[part] > 0, part


def test_a_lora_of_the_second_text_encoder_alone_changes_the_picture(lora_file, write_scene):
    te2 = lora_file("peft", parts=("text_encoder_2",), name="te2")
    scene = load_scene(write_scene(
        f"prompt: a portrait\nwidth: 64\nheight: 64\nsteps: 1\nseed: 2\nloras: [{{path: loras/{te2.name}}}]\n"))
    with_lora = render(scene, fresh_xl(), seed=2).latents
    assert not torch.allclose(with_lora, render(scene.model_copy(update={"loras": []}), fresh_xl(), seed=2).latents)


REGION_SCENE = """
prompt: a street
negative_prompt: '{negative}'
width: 96
height: 64
steps: 2
bootstrap_steps: 0
guidance_scale: 6.0
regions:
  - prompt: a woman with red hair
    box: [0, 0, 48, 64]
    loras:
      - path: loras/{lora}
        scale: 0.9
  - prompt: a man
    box: [48, 0, 96, 64]
"""


@pytest.mark.parametrize("negative", ["", "blurry"], ids=["zeros", "negative"])
def test_a_region_lora_equals_a_per_prompt_loop_with_the_lora_on_that_prompt_only(lora_file, write_scene, negative,
                                                                                   assert_close_batched):
    """With an empty negative prompt, each LoRA set's empty negative condition is zeros (the zeros rule
    after the conditions of several sets are put back in order)."""
    alice = lora_file("kohya", seed=2, name="alice")
    scene = load_scene(write_scene(REGION_SCENE.format(lora=alice.name, negative=negative)))
    ours = render(scene, fresh_xl(), seed=3).latents

    # the oracle: the global prompt and the man on a bare model, the woman on one with the LoRA loaded
    # by diffusers' own pipeline; each prompt encoded by that pipeline's encode_prompt
    bare, with_lora = xl_pipeline(fresh_xl()), xl_pipeline(fresh_xl())
    with_lora.load_lora_weights(str(alice), adapter_name="alice")
    with_lora.set_adapters(["alice"], [0.9])
    prompts = [(bare, "a street"), (with_lora, "a woman with red hair"), (bare, "a man")]
    schedule = DiffusionSchedule(make_scheduler("ddim", bare.scheduler.config))
    schedule.set_timesteps(2)
    # the canvas is smaller than the UNet's 128 px window: one view, conditioned as a whole 64x96 picture
    ids = bare._get_add_time_ids((64, 96), (0, 0), (64, 96), torch.float32,
                                 text_encoder_projection_dim=bare.text_encoder_2.config.projection_dim)
    noise = torch.randn((1, 4, 8, 12), generator=torch.Generator("cpu").manual_seed(3))
    with torch.inference_mode():
        encoded = [pipe.encode_prompt(text, device=CPU, negative_prompt=negative or None) for pipe, text in prompts]

        def model_output(p, x, t):
            (pipe, _), (cond, uncond, pooled, uncond_pooled) = prompts[p], encoded[p]

            def eps(hidden, text_embeds):
                return pipe.unet(x, t, encoder_hidden_states=hidden,
                                 added_cond_kwargs={"text_embeds": text_embeds, "time_ids": ids}).sample

            return guided(eps(uncond, uncond_pooled), eps(cond, pooled), 6.0)

        x = reference_multidiffusion(model_output, noise, schedule, scene_weights(scene))
    assert_close_batched(ours, x, guidance=6.0, steps=2)


def test_an_sd_lora_on_an_sdxl_model_names_the_file_and_the_family(tmp_path):
    from multidiff_cli.models.random_weights import build_tiny_random

    path = write_lora(tmp_path / "sd.safetensors", lora_layers(build_tiny_random(), parts=("unet", "text_encoder")),
                      "peft")  # its cross-attention keys and values take 32-wide text, SDXL's 64-wide
    with pytest.raises(LoraError, match=r"sd\.safetensors: not a LoRA for this model \(.*SDXL-shaped\): "
                                        r".*attn2\.to_k.* is \[2, 32\] in the file, \[2, 64\] in the model"):
        load_loras(fresh_xl(), [path])


def test_cli_renders_an_sdxl_region_lora_and_records_it(cli, tmp_path):
    write_lora(tmp_path / "style.safetensors", lora_layers(build_tiny_sdxl_random(), seed=4), "kohya")
    scene = tmp_path / "scene.yaml"
    scene.write_text("prompt: a room\nwidth: 64\nheight: 64\nsteps: 1\nseed: 1\nregions:\n"
                     "  - prompt: a lamp\n    box: [0, 0, 32, 64]\n    loras: [{path: style.safetensors, scale: 0.7}]\n")
    result = cli("render", str(scene), "--model", "tiny-sdxl-random", "-q",
                                      "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    record = read_metadata(tmp_path / "out" / "scene-1.png")
    assert record["scene"]["regions"][0]["loras"] == [{"path": "../style.safetensors", "scale": 0.7}]
    assert any(path.endswith("style.safetensors") for path in record["inputs"])


def test_a_text_encoder_lora_of_another_width_names_its_first_layer_and_both_shapes(tmp_path):
    """transformers raises 'look at the above report' for a text encoder; the one line names the layer itself."""
    widened = [(part, name, torch.zeros((2, 48)), torch.zeros((48, 2)))
               for part, name, _, _ in lora_layers(fresh_xl(), parts=("text_encoder",))]
    path = write_lora(tmp_path / "wide_te.safetensors", widened, "kohya")
    with pytest.raises(LoraError, match=r"wide_te\.safetensors: not a LoRA for this model \(.*SDXL-shaped\): "
                                        r"encoder\.layers\..*_proj\.lora_[AB]\.weight is \[\d+, \d+\] in the file, "
                                        r"\[\d+, \d+\] in the model$"):
        load_loras(fresh_xl(), [path])


def test_an_sdxl_lora_on_an_sd_model_says_it_is_one(lora_file):
    from multidiff_cli.models.random_weights import build_tiny_random

    te2 = lora_file("kohya", parts=("text_encoder_2",), name="te2")
    with pytest.raises(LoraError, match=r"te2_kohya\.safetensors: not a LoRA for this model \(tiny-random, .*\): it "
                                        r"has layers for a second text encoder \(text_encoder_2\), .*an SDXL LoRA\?"):
        load_loras(build_tiny_random().to(CPU, torch.float32), [te2])
