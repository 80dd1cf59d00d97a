"""LoRAs on FLUX.1 (issue 21), on tiny-flux-random: files written here with random factors for the tiny
transformer's layers and its CLIP half, in diffusers/peft keys and in kohya's keys (BFL's module names:
double_blocks_0_img_attn_qkv, lora_te1_...). A scene LoRA renders as diffusers' FluxPipeline with
load_lora_weights; a region's LoRA is exactly separated (where its region has no weight, the fused
prediction is bit for bit the one without it) and costs no extra sample on FLUX.1-dev; an SD LoRA on a
FLUX model is one line, exit 2."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multidiff_cli.method.guidance import guided_denoiser
from multidiff_cli.method.sampler import fuse_views
from multidiff_cli.method.views import full_view
from multidiff_cli.models.adapters import _tuner_layers
from multidiff_cli.models.device import quiet_libraries
from multidiff_cli.models.random_flux import build_tiny_flux_random
from multidiff_cli.run.render import render, scene_prompts, scene_weights
from multidiff_cli.scene import load_scene

CPU = torch.device("cpu")
TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
LAYOUTS = ["peft", "kohya"]
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # the transformer's joint and single blocks
# kohya's FLUX files name BFL's modules; (the diffusers modules each one is, fused in that order). A single
# block's linear1 (q, k, v and the MLP in one) is left out: diffusers' kohya conversion cuts it at FLUX.1's
# width, 3072, and the tiny transformer is 32 wide.
KOHYA_DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
                "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "txt_attn_proj": ("attn.to_add_out",), "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
                "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",)}
KOHYA_SINGLE = {"linear2": ("proj_out",), "modulation_lin": ("norm.linear",)}


def fresh():
    """A tiny-flux-random of its own (LoRAs get loaded into it), the same weights every time."""
    quiet_libraries()
    return build_tiny_flux_random().to(CPU, torch.float32)


@pytest.fixture(scope="module")
def bare():
    """tiny-flux-random with no LoRA ever loaded. Read-only."""
    return fresh()


def factors(generator, linear_in: int, linear_out: int, rank: int = 2, strength: float = 0.3):
    return (torch.randn((rank, linear_in), generator=generator) * strength,
            torch.randn((linear_out, rank), generator=generator) * strength)


def write_lora(path: Path, model, layout: str, parts=("transformer", "text_encoder"), seed: int = 1) -> Path:
    """peft: `transformer.<module>.lora_A.weight` on every linear layer of the transformer's blocks, and
    `text_encoder.text_model.<module>.lora_A.weight` on CLIP's attention projections (named as files in the
    wild name them, transformers 4's). kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
    .lora_up (the fused modules' rows stacked), .alpha (rank/2: up doubled, the same update), and
    `lora_te1_text_model_encoder_layers_0_self_attn_q_proj...` for CLIP."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add_kohya(key: str, down: torch.Tensor, up: torch.Tensor) -> None:
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = (up * 2).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(down.shape[0] / 2)

    modules = dict(model.transformer.named_modules())
    if "transformer" in parts and layout == "peft":
        for name, linear in sorted(modules.items()):
            if isinstance(linear, torch.nn.Linear) and name.startswith(BLOCKS):
                down, up = factors(generator, linear.in_features, linear.out_features)
                tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
    elif "transformer" in parts:
        blocks = [(f"double_blocks_{i}", f"transformer_blocks.{i}.", KOHYA_DOUBLE)
                  for i in range(model.transformer.config.num_layers)]
        blocks += [(f"single_blocks_{i}", f"single_transformer_blocks.{i}.", KOHYA_SINGLE)
                   for i in range(model.transformer.config.num_single_layers)]
        for kohya_block, block, table in blocks:
            for kohya_name, fused in table.items():
                linears = [modules[block + name] for name in fused]
                down, up = factors(generator, linears[0].in_features, sum(m.out_features for m in linears))
                add_kohya(f"lora_unet_{kohya_block}_{kohya_name}", down, up)
    if "text_encoder" in parts:
        for name, linear in sorted(model.text_encoder.named_modules()):
            if isinstance(linear, torch.nn.Linear) and name.endswith(TEXT_TARGETS):
                name = name if name.startswith("text_model.") else f"text_model.{name}"
                down, up = factors(generator, linear.in_features, linear.out_features)
                if layout == "peft":
                    tensors[f"text_encoder.{name}.lora_A.weight"] = down.contiguous()
                    tensors[f"text_encoder.{name}.lora_B.weight"] = up.contiguous()
                else:
                    add_kohya("lora_te1_" + name.replace(".", "_"), down, up)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def lora_file(tmp_path, bare):
    """lora_file(layout, parts, seed, name) -> a LoRA file for tiny-flux-random under tmp_path/loras."""

    def make(layout="peft", parts=("transformer", "text_encoder"), seed=1, name="style"):
        (tmp_path / "loras").mkdir(exist_ok=True)
        return write_lora(tmp_path / "loras" / f"{name}_{layout}.safetensors", bare, layout, parts, seed)

    return make


def scene_of(write_scene, text: str):
    return load_scene(write_scene(text), default_model="tiny-flux-random")


def flux_pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config), vae=model.vae,
                        text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                        text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                        transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- a scene LoRA: FluxPipeline with load_lora_weights ------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_scene_lora_renders_as_diffusers_flux_pipeline_with_that_lora(lora_file, write_scene, bare, layout,
                                                                        assert_close_batched):
    """The transformer's and CLIP's halves, loaded through FluxPipeline's conversion, as its own
    load_lora_weights and set_adapters load them; the pipeline draws its noise from the seed's generator."""
    style = lora_file(layout)
    scene = scene_of(write_scene, f"prompt: a portrait\nwidth: 96\nheight: 64\nsteps: 2\nguidance_scale: 4.0\n"
                                  f"seed: 5\nloras:\n  - path: loras/{style.name}\n    scale: 0.6\n")
    ours = render(scene, fresh(), seed=5).latents

    pipe = flux_pipeline(fresh())
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["style"], [0.6])
    with torch.inference_mode():
        packed = pipe("a portrait", height=64, width=96, num_inference_steps=2, guidance_scale=4.0,
                      generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images
    theirs = pipe._unpack_latents(packed, 64, 96, pipe.vae_scale_factor)
    without = render(scene.model_copy(update={"loras": []}), bare, seed=5).latents
    assert (without - theirs).abs().max() > 100 * (ours - theirs).abs().max()  # the LoRA matters
    assert_close_batched(ours, theirs, steps=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layer_of_the_file_loads_into_the_transformer_and_clip(lora_file, layout):
    """kohya's fused qkv becomes three layers of diffusers' transformer; T5 takes no LoRA."""
    style = lora_file(layout)
    model = fresh()
    blocks = [name for name, m in model.transformer.named_modules()
              if isinstance(m, torch.nn.Linear) and name.startswith(BLOCKS)]
    # the tiny transformer has one joint block and one single block
    wanted = len(blocks) if layout == "peft" else sum(
        len(fused) for table in (KOHYA_DOUBLE, KOHYA_SINGLE) for fused in table.values())
    text = sum(1 for name, m in model.text_encoder.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(TEXT_TARGETS))
    model.load_loras([style])
    assert len(_tuner_layers(model, ("transformer",))) == wanted > 0
    assert len(_tuner_layers(model, ("text_encoder",))) == text > 0
    assert not _tuner_layers(model, ("text_encoder_2",))


def test_a_lora_of_the_clip_half_alone_changes_the_picture(lora_file, write_scene, bare):
    """CLIP gives FLUX its pooled embedding: a LoRA of CLIP's layers only still reaches the render."""
    clip = lora_file("peft", parts=("text_encoder",), name="clip")
    scene = scene_of(write_scene, f"prompt: a portrait\nwidth: 64\nheight: 64\nsteps: 1\nseed: 2\n"
                                  f"loras: [{{path: loras/{clip.name}}}]\n")
    with_lora = render(scene, fresh(), seed=2).latents
    assert not torch.allclose(with_lora, render(scene.model_copy(update={"loras": []}), bare, seed=2).latents)


# --- a region LoRA: exact separation, and what it costs -------------------------------------------------------------

REGION_SCENE = """
prompt: a street
width: 96
height: 64
steps: 2
bootstrap_steps: 0
guidance_scale: 3.0
{extra}regions:
  - prompt: a woman with red hair
    box: [0, 0, 48, 64]
    loras:
      - path: loras/{lora}
        scale: 0.9
  - prompt: a man
    box: [64, 0, 96, 64]
"""


def one_step(model, scene):
    """Every prompt's (guided) velocity at one step on one latent, one sample per network call (so no batch
    changes the arithmetic), and the fused one (Eq. 5), as render computes them."""
    prompts = scene_prompts(scene, model.facts.embedded_guidance, model.embedded_guidance, model.facts.cfg_offset)
    files = sorted({Path(path) for adapters in prompts.adapters for path, _ in adapters})
    if files:
        model.load_loras(files)
    conditioning = model.encode_conditions(prompts.texts, prompts.adapters, prompts.cond, prompts.negative, (64, 96),
                                           prompts.embedded)
    x = torch.randn((1, 16, 8, 12), generator=torch.Generator().manual_seed(0))
    requests = [(0, p) for p in range(len(prompts.cond))]
    weights = scene_weights(scene)
    with torch.inference_mode():
        predictions = guided_denoiser(model.sample_run(1), conditioning, prompts)(x, torch.tensor(600.0), requests)
        fused = fuse_views(predictions, requests, [full_view((8, 12))] * len(requests), weights)
    return predictions, fused, weights


@pytest.mark.parametrize("extra", ["", "negative_prompt: blurry\ntrue_cfg_scale: 2.0\n"], ids=["embedded", "true-cfg"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_bleeding_where_the_lora_region_has_no_weight_the_fused_prediction_is_exactly_the_bare_one(
        lora_file, write_scene, bare, layout, extra):
    alice = lora_file(layout, seed=2, name="alice")
    scene = scene_of(write_scene, REGION_SCENE.format(lora=alice.name, extra=extra))
    with_lora, fused, weights = one_step(fresh(), scene)
    without_lora = scene.model_copy(update={"regions": [scene.regions[0].model_copy(update={"loras": []}),
                                                        scene.regions[1]]})
    without, fused_bare, _ = one_step(bare, without_lora)
    assert torch.equal(with_lora[[0, 2]], without[[0, 2]])  # the global prompt and the other region
    assert not torch.equal(with_lora[1], without[1])  # the LoRA region's own prediction changed
    outside = weights[1, 0] == 0
    assert outside.any() and torch.equal(fused[..., outside], fused_bare[..., outside])
    assert not torch.equal(fused[..., ~outside], fused_bare[..., ~outside])


@contextlib.contextmanager
def transformer_calls(model):
    """The number of samples of every call of the model's transformer."""
    sizes: list[int] = []
    handle = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


@pytest.mark.parametrize("extra, per_step", [("", 3), ("negative_prompt: blurry\ntrue_cfg_scale: 2.0\n", 5)],
                         ids=["embedded", "true-cfg"])
def test_a_region_lora_costs_no_sample_on_dev_and_one_negative_sample_with_true_cfg(lora_file, write_scene, extra,
                                                                                    per_step):
    """Embedded guidance: N+1 samples a step whatever the LoRAs, in one call per LoRA set. True CFG: the LoRA
    region's negative pass runs under its LoRA, apart from the shared one: N+3."""
    alice = lora_file(seed=2, name="alice")
    model = fresh()
    with transformer_calls(model) as sizes:
        render(scene_of(write_scene, REGION_SCENE.format(lora=alice.name, extra=extra)), model, seed=0)
    assert sum(sizes) == 2 * per_step
    assert len(sizes) == 2 * 2  # two adapter sets: two transformer calls a step


# --- what FLUX refuses ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_sd_lora_on_flux_is_one_line_exit_2_nothing_written(cli, write_scene, tmp_path, layout):
    """diffusers' keys (unet.) are converted and fit nothing; kohya's (lora_unet_down_blocks_...) make
    diffusers' FLUX conversion raise 'Incompatible keys': both are named an SD or SDXL LoRA."""
    from multidiff_cli.models.random_weights import build_tiny_random

    sd = build_tiny_random()
    tensors = {}
    for name, linear in sd.unet.named_modules():
        if isinstance(linear, torch.nn.Linear) and name.endswith((".to_q", ".to_k")):
            down, up = torch.zeros(2, linear.in_features), torch.zeros(linear.out_features, 2)
            if layout == "peft":
                tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = down, up
            else:
                key = "lora_unet_" + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(tmp_path / "sd_style.safetensors"))
    scene = write_scene("prompt: a room\nwidth: 64\nheight: 64\nsteps: 1\nloras: [{path: sd_style.safetensors}]\n")
    result = cli("render", scene, "--model", "tiny-flux-random", "-q", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.endswith("sd_style.safetensors: not a LoRA for this model (tiny-flux-random, FLUX.1-shaped, 32 wide): "
                         "it names a UNet (unet. layers): a LoRA of an SD or SDXL model"), line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
