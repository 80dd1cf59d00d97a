"""FLUX.1's LoRAs, single files and refusals (issue 21): a scene-wide LoRA in the diffusers/peft and kohya (on
diffusers' names and on BFL's: double_blocks_0_img_attn_qkv, lora_te1_ for CLIP) layouts equals
FluxPipeline with diffusers' own load_lora_weights, every layer of it loaded; a LoRA of the CLIP half alone reaches
the picture; a region LoRA is exactly separated (outside its region the fused prediction is the one without it,
bit for bit) and costs no sample on FLUX.1-dev; a transformer in BFL's layout (as flux1-dev.safetensors ships)
loads as a single file and renders as its folder; what FLUX refuses is one line. XLabs LoRAs and the memory
check: test_flux_xlabs_memory.py."""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from multidiff_cli.method.guidance import guided_denoiser
from multidiff_cli.method.sampler import fuse_views
from multidiff_cli.method.views import full_view
from multidiff_cli.models.adapters import _tuner_layers
from multidiff_cli.models.loading import load_model
from multidiff_cli.models.random_flux import build_tiny_flux_random
from multidiff_cli.models.random_weights import save_model
from multidiff_cli.run.render import render, scene_prompts, scene_weights
from multidiff_cli.scene import load_scene
from reference import flux_pipeline, scene_of

CPU = torch.device("cpu")
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
CLIP_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
# kohya's FLUX files (sd-scripts, ai-toolkit) name BFL's modules: each one with the diffusers modules it is, fused
# in that order. A single block's linear1 (q, k, v and the MLP in one) is left out: diffusers' kohya conversion
# cuts it at FLUX.1's width, 3072, and the tiny transformer is 32 wide.
KOHYA_BFL_DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
                    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                    "txt_attn_proj": ("attn.to_add_out",), "img_mlp_0": ("ff.net.0.proj",),
                    "img_mlp_2": ("ff.net.2",), "txt_mlp_0": ("ff_context.net.0.proj",),
                    "txt_mlp_2": ("ff_context.net.2",)}
KOHYA_BFL_SINGLE = {"linear2": ("proj_out",), "modulation_lin": ("norm.linear",)}


@pytest.fixture(scope="module")
def dev():
    return build_tiny_flux_random()


def lora_layers(model, seed: int, rank: int = 2, strength: float = 0.3, text: bool = True):
    """(part, module, down (rank, in), up (out, rank)) for every attention projection of the transformer (and,
    with text, of the CLIP encoder's attention)."""
    generator = torch.Generator().manual_seed(seed)
    parts = [("transformer", TARGETS)] + ([("text_encoder", CLIP_TARGETS)] if text else [])
    layers = []
    for part, suffixes in parts:
        for name, linear in sorted(getattr(model, part).named_modules()):
            if isinstance(linear, torch.nn.Linear) and name.endswith(suffixes):
                layers.append((part, name, torch.randn((rank, linear.in_features), generator=generator) * strength,
                               torch.randn((linear.out_features, rank), generator=generator) * strength))
    return layers


def write_lora(path, layers, layout: str):
    """peft: `<part>.<module>.lora_A/B.weight`; kohya (sd-scripts on diffusers' FLUX names): `lora_transformer_
    <module_underscored>.lora_down/.lora_up/.alpha`, alpha = rank / 2 and up doubled (the same update)."""
    tensors = {}
    for part, name, down, up in layers:
        if layout == "peft":
            tensors[f"{part}.{name}.lora_A.weight"] = down
            tensors[f"{part}.{name}.lora_B.weight"] = up
        else:
            key = f"lora_{part}_{name.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up * 2
            tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]) / 2)
    save_file(tensors, str(path))
    return path


PLAIN = "prompt: a red sofa in a room\nwidth: 96\nheight: 64\nsteps: 2\nseed: 9\nguidance_scale: 4.0\n"


def kohya_bfl_lora(path, model, seed: int, rank: int = 2, strength: float = 0.3):
    """kohya's FLUX keys on BFL's module names, as sd-scripts writes them: `lora_unet_double_blocks_0_img_attn_qkv
    .lora_down/.lora_up/.alpha` (a fused module's up rows stacked), and CLIP's `lora_te1_text_model_encoder_
    layers_0_self_attn_q_proj...`; alpha = rank / 2 and up doubled (the same update)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(key, linear_in, linear_out):
        tensors[f"{key}.lora_down.weight"] = torch.randn((rank, linear_in), generator=generator) * strength
        tensors[f"{key}.lora_up.weight"] = torch.randn((linear_out, rank), generator=generator) * strength * 2
        tensors[f"{key}.alpha"] = torch.tensor(rank / 2)

    modules = dict(model.transformer.named_modules())
    config = model.transformer.config
    blocks = [(f"double_blocks_{i}", f"transformer_blocks.{i}.", KOHYA_BFL_DOUBLE) for i in range(config.num_layers)]
    blocks += [(f"single_blocks_{i}", f"single_transformer_blocks.{i}.", KOHYA_BFL_SINGLE)
               for i in range(config.num_single_layers)]
    for kohya_block, block, table in blocks:
        for kohya_name, fused in table.items():
            linears = [modules[block + name] for name in fused]
            add(f"lora_unet_{kohya_block}_{kohya_name}", linears[0].in_features, sum(m.out_features for m in linears))
    for name, linear in sorted(model.text_encoder.named_modules()):
        if isinstance(linear, torch.nn.Linear) and name.endswith(CLIP_TARGETS):
            name = name if name.startswith("text_model.") else f"text_model.{name}"  # as files in the wild name it
            add("lora_te1_" + name.replace(".", "_"), linear.in_features, linear.out_features)
    save_file(tensors, str(path))
    return path


def any_lora(path, model, layout: str, seed: int):
    """A LoRA file of tiny-flux-random in `layout`: peft (transformer and CLIP attention), kohya (diffusers'
    names, the transformer only), kohya-bfl (BFL's names, transformer and CLIP). XLabs' layout:
    test_flux_xlabs_memory.py."""
    if layout == "kohya-bfl":
        return kohya_bfl_lora(path, model, seed=seed)
    return write_lora(path, lora_layers(model, seed=seed, text=layout == "peft"), layout)


@pytest.mark.parametrize("layout", ["peft", "kohya", "kohya-bfl"])
def test_a_scene_lora_renders_as_flux_pipeline_with_load_lora_weights(dev, write_scene, tmp_path, layout,
                                                                     assert_close_batched):
    (tmp_path / "loras").mkdir()
    style = any_lora(tmp_path / "loras" / "style.safetensors", dev, layout, seed=1)
    scene = scene_of(write_scene, dev, PLAIN + "loras:\n  - path: loras/style.safetensors\n    scale: 0.8\n")
    ours = render(scene, copy.deepcopy(dev), seed=9).latents
    pipe = flux_pipeline(copy.deepcopy(dev))
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    with torch.inference_mode():
        packed = pipe("a red sofa in a room", height=64, width=96, num_inference_steps=2, guidance_scale=4.0,
                      generator=torch.Generator("cpu").manual_seed(9), output_type="latent").images
    theirs = pipe._unpack_latents(packed, 64, 96, pipe.vae_scale_factor)
    bare = render(scene.model_copy(update={"loras": []}), dev, seed=9).latents
    assert (bare - theirs).abs().max() > 100 * (ours - theirs).abs().max()  # the LoRA matters
    assert_close_batched(ours, theirs, steps=2)


@pytest.mark.parametrize("layout", ["peft", "kohya", "kohya-bfl"])
def test_every_layer_of_the_file_loads_into_the_transformer_and_clip(dev, tmp_path, layout):
    """kohya's fused qkv on BFL's names becomes three layers of diffusers' transformer; T5 takes no LoRA."""
    style = any_lora(tmp_path / "style.safetensors", dev, layout, seed=1)
    model = copy.deepcopy(dev)
    attention = sum(1 for name, m in model.transformer.named_modules()
                    if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS))
    # the tiny transformer has one joint block and one single block
    bfl = sum(len(fused) for table in (KOHYA_BFL_DOUBLE, KOHYA_BFL_SINGLE) for fused in table.values())
    clip = sum(1 for name, m in model.text_encoder.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(CLIP_TARGETS))
    model.load_loras([style])
    assert len(_tuner_layers(model, ("transformer",))) == (bfl if layout == "kohya-bfl" else attention) > 0
    assert len(_tuner_layers(model, ("text_encoder",))) == (0 if layout == "kohya" else clip)
    assert not _tuner_layers(model, ("text_encoder_2",))


def test_a_lora_of_the_clip_half_alone_changes_the_picture(dev, write_scene, tmp_path):
    """CLIP gives FLUX its pooled embedding: a LoRA of CLIP's layers only still reaches the render."""
    (tmp_path / "loras").mkdir()
    clip = [layer for layer in lora_layers(dev, seed=3) if layer[0] == "text_encoder"]
    write_lora(tmp_path / "loras" / "clip.safetensors", clip, "peft")
    scene = scene_of(write_scene, dev, "prompt: a portrait\nwidth: 64\nheight: 64\nsteps: 1\nseed: 2\n"
                                       "loras: [{path: loras/clip.safetensors}]\n")
    with_lora = render(scene, copy.deepcopy(dev), seed=2).latents
    assert not torch.allclose(with_lora, render(scene.model_copy(update={"loras": []}), dev, seed=2).latents)


REGION = """
prompt: a street
width: 96
height: 64
steps: 1
bootstrap_steps: 0
guidance_scale: 3.0
max_batch: 1
regions:
  - prompt: a woman with red hair
    box: [0, 0, 48, 64]
{loras}"""


def test_a_region_lora_is_exactly_separated(dev, write_scene, tmp_path):
    """One sample per call (max_batch 1), so both renders run the same calls on the bare model: where the woman
    has no weight, the canvas is the render's without her LoRA, bit for bit; inside her box, it differs."""
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "alice.safetensors", lora_layers(dev, seed=2), "peft")
    with_lora = scene_of(write_scene, dev, REGION.format(
        loras="    loras:\n      - path: loras/alice.safetensors\n        scale: 0.9\n"), "with.yaml")
    without = scene_of(write_scene, dev, REGION.format(loras=""), "without.yaml")
    ours = render(with_lora, copy.deepcopy(dev), seed=5).latents
    plain = render(without, dev, seed=5).latents
    outside, inside = (slice(None), slice(None), slice(None), slice(6, None)), (
        slice(None), slice(None), slice(None), slice(0, 6))
    assert torch.equal(ours[outside], plain[outside])
    assert (ours[inside] - plain[inside]).abs().max() > 1e-3


TWO_REGIONS = """
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
      - path: loras/alice.safetensors
        scale: 0.9
  - prompt: a man
    box: [64, 0, 96, 64]
"""
TRUE_CFG = "negative_prompt: blurry\ntrue_cfg_scale: 2.0\n"


def one_step(model, scene):
    """Every prompt's (guided) velocity at one step on one latent, one sample per network call (so no batch
    changes the arithmetic), and the fused one (Eq. 5), as render computes them."""
    prompts = scene_prompts(scene, model.facts.embedded_guidance, model.embedded_guidance, model.facts.cfg_offset)
    files = sorted({path for adapters in prompts.adapters for path, _ in adapters})
    if files:
        from pathlib import Path

        model.load_loras([Path(path) for path in files])
    conditioning = model.encode_conditions(prompts.texts, prompts.adapters, prompts.cond, prompts.negative, (64, 96),
                                           prompts.embedded)
    x = torch.randn((1, 16, 8, 12), generator=torch.Generator().manual_seed(0))
    requests = [(0, p) for p in range(len(prompts.cond))]
    weights = scene_weights(scene)
    with torch.inference_mode():
        predictions = guided_denoiser(model.sample_run(1), conditioning, prompts)(x, torch.tensor(600.0), requests)
        fused = fuse_views(predictions, requests, [full_view((8, 12))] * len(requests), weights)
    return predictions, fused, weights


@pytest.mark.parametrize("extra", ["", TRUE_CFG], ids=["embedded", "true-cfg"])
def test_where_the_lora_region_has_no_weight_the_fused_velocity_is_exactly_the_bare_one(dev, write_scene, tmp_path,
                                                                                       extra):
    """The other prompts' velocities (and with true CFG the shared negative pass) are the bare model's bit for
    bit; the LoRA region's own changed; the fused velocity differs only where that region has weight."""
    (tmp_path / "loras").mkdir()
    kohya_bfl_lora(tmp_path / "loras" / "alice.safetensors", dev, seed=2)
    scene = scene_of(write_scene, dev, TWO_REGIONS.format(extra=extra))
    with_lora, fused, weights = one_step(copy.deepcopy(dev), scene)
    bare = scene.model_copy(update={"regions": [scene.regions[0].model_copy(update={"loras": []}), scene.regions[1]]})
    without, fused_bare, _ = one_step(dev, bare)
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


@pytest.mark.parametrize("extra, per_step", [("", 2 + 1), (TRUE_CFG, 2 + 3)], ids=["embedded", "true-cfg"])
def test_a_region_lora_costs_no_sample_on_dev_and_one_negative_sample_with_true_cfg(dev, write_scene, tmp_path,
                                                                                    extra, per_step):
    """Embedded guidance: N+1 samples a step whatever the LoRAs, in one call per LoRA set. True CFG: the LoRA
    region's negative pass runs under its LoRA, apart from the shared one: N+3."""
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "alice.safetensors", lora_layers(dev, seed=2), "peft")
    model = copy.deepcopy(dev)
    with transformer_calls(model) as sizes:
        render(scene_of(write_scene, dev, TWO_REGIONS.format(extra=extra)), model, seed=0)
    assert sum(sizes) == 2 * per_step
    assert len(sizes) == 2 * 2  # two adapter sets: two transformer calls a step


# --- refusals: one line, exit 2, nothing written ----------------------------------------------------------------


@pytest.fixture
def sd_lora(tmp_path):
    """LoRAs of an SD model: diffusers' unet. layers (sd_style), and kohya's (sd_kohya: lora_unet_down_blocks_...,
    which diffusers' FLUX conversion refuses as 'Incompatible keys')."""
    path = tmp_path / "sd_style.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2)},
              str(path))
    kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{kohya}.lora_down.weight": torch.zeros(2, 32), f"{kohya}.lora_up.weight": torch.zeros(32, 2),
               f"{kohya}.alpha": torch.tensor(2.0)}, str(tmp_path / "sd_kohya.safetensors"))
    return path


@pytest.mark.parametrize("text, said", [
    ("prompt: p\nwidth: 72\nheight: 64\n", "width: must be a multiple of 16 for FLUX.1 models: try 64"),
    ("prompt: p\nwidth: 64\nheight: 64\ntrue_cfg_scale: 3\n", "true_cfg_scale: needs a negative_prompt"),
    ("prompt: p\nwidth: 64\nheight: 64\nscheduler: ddim\n", "FLUX.1 models take euler, heun, dpm++, unipc"),
    ("prompt: p\nwidth: 64\nheight: 64\nloras: [sd_style.safetensors]\n", "a LoRA of an SD or SDXL model"),
    ("prompt: p\nwidth: 64\nheight: 64\nloras: [sd_kohya.safetensors]\n", "sd_kohya.safetensors: not a LoRA for "
     "this model (tiny-flux-random, FLUX.1-shaped, 32 wide): it names a UNet (unet. layers): a LoRA of an SD or SDXL "
     "model"),
], ids=["8-not-16", "true-cfg-without-negative", "ddim", "sd-lora", "sd-kohya-lora"])
def test_what_flux_refuses_is_one_line_and_nothing_written(cli, write_scene, tmp_path, sd_lora, text, said):
    result = cli("render", write_scene(text), "--model", "tiny-flux-random", "-q", "-o", tmp_path / "out.png")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert said in line and "Traceback" not in result.output
    assert not (tmp_path / "out.png").exists()


# --- a single file in BFL's layout --------------------------------------------------------------------------------


def bfl_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel's weights in Black Forest Labs' own layout (flux1-dev.safetensors): the
    inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers (q, k and v fused, the final
    modulation's shift and scale swapped back)."""
    out, s = {}, dict(state)

    def take(name):
        return s.pop(name)

    def pair(diffusers_name, bfl_name):
        for suffix in ("weight", "bias"):
            out[f"{bfl_name}.{suffix}"] = take(f"{diffusers_name}.{suffix}")

    for old, new in (("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                     ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                     ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                     ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                     ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                     ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
                     ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear")):
        pair(old, new)
    doubles = sorted({int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")})
    for i in doubles:
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        pair(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        pair(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        for suffix in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{suffix}"] = torch.cat([take(f"{d}.attn.to_{x}.{suffix}") for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{suffix}"] = torch.cat([take(f"{d}.attn.add_{x}_proj.{suffix}") for x in "qkv"])
        for old, new in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{b}.{new}.scale"] = take(f"{d}.attn.{old}.weight")
        for old, new in (("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                         ("ff_context.net.2", "txt_mlp.2"), ("attn.to_out.0", "img_attn.proj"),
                         ("attn.to_add_out", "txt_attn.proj")):
            pair(f"{d}.{old}", f"{b}.{new}")
    singles = sorted({int(k.split(".")[1]) for k in s if k.startswith("single_transformer_blocks.")})
    for i in singles:
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        pair(f"{d}.norm.linear", f"{b}.modulation.lin")
        for suffix in ("weight", "bias"):
            out[f"{b}.linear1.{suffix}"] = torch.cat([take(f"{d}.attn.to_{x}.{suffix}") for x in "qkv"]
                                                     + [take(f"{d}.proj_mlp.{suffix}")])
        out[f"{b}.norm.query_norm.scale"] = take(f"{d}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = take(f"{d}.attn.norm_k.weight")
        pair(f"{d}.proj_out", f"{b}.linear2")
    for suffix in ("weight", "bias"):
        scale, shift = take(f"norm_out.linear.{suffix}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
    assert not s, f"unmapped: {sorted(s)[:5]}"
    return out


@pytest.mark.slow
def test_a_bfl_single_file_loads_and_renders_as_the_model_it_holds(tmp_path, ram_path, write_scene, monkeypatch):
    """diffusers' BFL conversion assumes FLUX.1's width (3072) and MLP ratio, so the file's transformer has them,
    with one joint and one single block (0.5 B parameters); everything else is tiny-flux-random's. The file
    holds the transformer alone, as flux1-dev.safetensors does: the other parts, and the transformer's config,
    come from model_config. Unlike test_flux.py's tiny-width test, diffusers' conversion runs unpatched."""
    from diffusers import FluxTransformer2DModel

    model = build_tiny_flux_random()
    folder = tmp_path / "flux-configs"
    save_model(model, folder)  # the tiny parts, then the wide transformer's config in place of the tiny one's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model.transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=128, num_attention_heads=24,
                                                   joint_attention_dim=32, pooled_projection_dim=32,
                                                   guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    model.transformer.save_config(folder / "transformer")
    index = json.loads((folder / "model_index.json").read_text())
    index.update({"transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "text_encoder_2": ["transformers", "T5EncoderModel"],
                  "tokenizer_2": ["transformers", "T5TokenizerFast"],
                  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
    (folder / "model_index.json").write_text(json.dumps(index))
    single = ram_path / "flux1-dev.safetensors"  # in bfloat16, as BFL ships it: 1 GB, written to memory
    model.transformer.to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in bfl_layout(model.transformer.state_dict()).items()}, str(single))
    model.transformer.to(torch.float32)  # what the file holds, in the render's dtype
    loaded = load_model(str(single), CPU, torch.float32, config=str(folder))
    assert loaded.family == "flux"
    theirs, ours = model.transformer.state_dict(), loaded.transformer.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(value, theirs[key]) for key, value in ours.items())

    def public(config):  # as saved: tuples as lists, without diffusers' private keys
        return json.loads(json.dumps({key: value for key, value in config.items() if not key.startswith("_")}))

    assert public(loaded.transformer.config) == public(model.transformer.config)
    # one prompt and T5 cut at 32 tokens (FLUX.1 pads to 512): at FLUX.1's width every token of every sample costs
    # a GFLOP, and what is compared is the loaded model against the one it holds, not the prompt's length
    monkeypatch.setattr("multidiff_cli.models.flux.MAX_SEQUENCE_LENGTH", 32)
    scene = load_scene(write_scene("prompt: a boat\nwidth: 64\nheight: 64\nsteps: 1\n"), default_model=str(folder))
    torch.testing.assert_close(render(scene, loaded, seed=2).latents, render(scene, model, seed=2).latents,
                               rtol=0, atol=1e-6)
