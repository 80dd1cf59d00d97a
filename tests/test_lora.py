"""LoRAs: scene-wide and per region, diffusers/peft and kohya/A1111 files, exact separation between regions.

LoRA files are built here with random weights for tiny-random's attention projections (UNet and text
encoder), in both layouts; each test loads them into its own fresh model (the session's `tiny` stays bare).
"""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from multidiff_cli.errors import LoraError, SceneError
from multidiff_cli.models.device import quiet_libraries
from multidiff_cli.models.adapters import load_loras
from multidiff_cli.models.random_weights import build_tiny_random
from multidiff_cli.run.render import render, scene_prompts
from multidiff_cli.scene import load_scene
from reference import one_step, sd_pipeline, sd_region_reference

UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
FORMATS = ["peft", "kohya"]


def lora_layers(components, rank=2, seed=0, strength=0.3):
    """Random LoRA factors (part, module name, down (r, in), up (out, r)) for every attention projection."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for part, module, suffixes in (("unet", components.unet, UNET_TARGETS),
                                   ("text_encoder", components.text_encoder, TEXT_TARGETS)):
        for name, linear in sorted(module.named_modules()):
            if isinstance(linear, torch.nn.Linear) and name.endswith(suffixes):
                down = torch.randn((rank, linear.in_features), generator=generator) * strength
                up = torch.randn((linear.out_features, rank), generator=generator) * strength
                layers.append((part, name, down, up))
    return layers


def write_lora(path, layers, layout: str):
    """A LoRA file: diffusers/peft keys (unet.<module>.lora_A.weight) or kohya/A1111 keys
    (lora_unet_<module_with_underscores>.lora_down.weight, .lora_up.weight, .alpha). The kohya file
    stores alpha = rank/2, so up is doubled: both give the same update, up @ down at scale 1."""
    tensors = {}
    for part, name, down, up in layers:
        if layout == "peft":  # text-encoder layers named as files in the wild name them (transformers 4's)
            module = name if part == "unet" or name.startswith("text_model.") else f"text_model.{name}"
            tensors[f"{part}.{module}.lora_A.weight"] = down.contiguous()
            tensors[f"{part}.{module}.lora_B.weight"] = up.contiguous()
        else:
            key = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + name.replace(".", "_")
            rank = down.shape[0]
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = (up * 2).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    save_file(tensors, str(path))
    return path


def fresh_model():
    quiet_libraries()
    return build_tiny_random().to(torch.device("cpu"), torch.float32)


@pytest.fixture
def model():
    """A tiny-random model of its own: LoRAs get loaded into it."""
    return fresh_model()


@pytest.fixture
def loras(tmp_path, model):
    """loras(layout) -> (film, alice): two LoRA files in `layout` under tmp_path/loras."""

    def make(layout="peft"):
        (tmp_path / "loras").mkdir(exist_ok=True)
        film = write_lora(tmp_path / "loras" / f"film_{layout}.safetensors", lora_layers(model, seed=1), layout)
        alice = write_lora(tmp_path / "loras" / f"alice_{layout}.safetensors", lora_layers(model, seed=2), layout)
        return film, alice

    return make


@pytest.mark.parametrize("layout", FORMATS)
def test_a_scene_lora_renders_as_diffusers_pipeline_with_that_lora(model, loras, write_scene, layout,
                                                                   assert_close_batched):
    film, _ = loras(layout)
    scene = load_scene(write_scene(
        f"prompt: a portrait\nnegative_prompt: blurry\nwidth: 64\nheight: 64\nsteps: 2\nseed: 5\n"
        f"loras:\n  - path: loras/{film.name}\n    scale: 0.6\n"
    ))
    ours = render(scene, model, seed=5).latents

    peer = fresh_model()
    pipe = sd_pipeline(peer)
    pipe.load_lora_weights(str(film), adapter_name="film")
    pipe.set_adapters(["film"], [0.6])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    with torch.inference_mode():
        theirs = pipe("a portrait", negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
                      guidance_scale=7.5, latents=noise, output_type="latent").images
    bare = render(scene.model_copy(update={"loras": []}), fresh_model(), seed=5).latents
    assert (bare - theirs).abs().max() > 100 * (ours - theirs).abs().max()  # the LoRA matters
    assert_close_batched(ours, theirs, guidance=7.5, steps=2)


REGION_SCENE = """
prompt: a street
negative_prompt: blurry
width: 96
height: 64
steps: 2
bootstrap_steps: 0
regions:
  - prompt: a woman with red hair
    box: [0, 0, 48, 64]
    loras:
      - path: loras/{alice}
        scale: 0.9
  - prompt: a man
    box: [48, 0, 96, 64]
"""


@pytest.mark.parametrize("layout", FORMATS)
def test_a_region_lora_equals_a_per_prompt_loop_with_the_lora_on_that_prompt_only(model, loras, write_scene, layout,
                                                                                   assert_close_batched):
    _, alice = loras(layout)
    scene = load_scene(write_scene(REGION_SCENE.format(alice=alice.name)))
    ours = render(scene, model, seed=3).latents

    # the oracle: the reference loop over two models, one with the LoRA loaded by diffusers' own pipeline, one
    # bare; each prompt encoded by its pipeline's encode_prompt, its own UNet calls and its own step
    bare, with_lora = sd_pipeline(fresh_model()), sd_pipeline(fresh_model())
    with_lora.load_lora_weights(str(alice), adapter_name="alice")
    with_lora.set_adapters(["alice"], [0.9])
    pipes = [bare, with_lora, bare]

    def unet_output(p, x, t, hidden, conditional):
        return pipes[p].unet(x, t, encoder_hidden_states=hidden).sample

    reference = sd_region_reference(scene, pipes, unet_output, seed=3)
    assert_close_batched(ours, reference, guidance=7.5, steps=2)


def test_no_bleeding_where_the_lora_region_has_no_weight_the_fused_prediction_is_exactly_the_bare_one(
        model, loras, write_scene):
    _, alice = loras()
    scene = load_scene(write_scene(REGION_SCENE.format(alice=alice.name)))
    with_lora, fused, weights = one_step(model, scene)
    without, fused_bare, _ = one_step(fresh_model(), scene.model_copy(update={"regions": [
        scene.regions[0].model_copy(update={"loras": []}), scene.regions[1]]}))
    assert torch.equal(with_lora[[0, 2]], without[[0, 2]])  # the global prompt and the other region
    assert not torch.equal(with_lora[1], without[1])  # the LoRA region's own prediction changed
    outside = weights[1, 0] == 0
    assert outside.any() and torch.equal(fused[..., outside], fused_bare[..., outside])
    assert not torch.equal(fused[..., ~outside], fused_bare[..., ~outside])


@pytest.mark.parametrize("regions", [1, 3])
def test_one_region_lora_costs_one_unconditional_sample_more(model, loras, write_scene, unet_doubles, regions):
    """N regions, one with a LoRA: N+1 conditional samples, the shared unconditional, and the LoRA
    region's own unconditional: N+3 a step, not 2(N+1)."""
    _, alice = loras()
    boxes = "".join(f"  - prompt: thing {i}\n    box: [{i * 32}, 0, {i * 32 + 32}, 64]\n" for i in range(1, regions))
    scene = load_scene(write_scene(
        f"prompt: a street\nwidth: 128\nheight: 64\nsteps: 3\nbootstrap_steps: 0\nregions:\n"
        f"  - prompt: alice\n    box: [0, 0, 32, 64]\n    loras: [{{path: loras/{alice.name}}}]\n{boxes}"
    ))
    load_loras(model, [alice])  # into the real UNet, before the counting double wraps it
    counting = unet_doubles.Counting(model.unet)
    model.unet = counting
    render(scene, model, seed=0)
    assert counting.samples == 3 * (regions + 3)
    assert len(counting.sizes) == 3 * 2  # two adapter sets: two UNet calls a step


def test_a_lora_shared_by_every_prompt_shares_the_unconditional_sample(model, loras, write_scene, unet_doubles):
    film, _ = loras()
    scene = load_scene(write_scene(
        f"prompt: a street\nwidth: 128\nheight: 64\nsteps: 2\nbootstrap_steps: 0\nloras: [{{path: loras/{film.name}}}]\n"
        "regions:\n  - prompt: a\n    box: [0, 0, 48, 64]\n  - prompt: b\n    box: [64, 0, 112, 64]\n"
    ))
    load_loras(model, [film])
    counting = unet_doubles.Counting(model.unet)
    model.unet = counting
    render(scene, model, seed=0)
    assert counting.samples == 2 * (2 + 2)  # N+2, as without LoRAs


def test_conditions_are_keyed_by_text_and_lora_set(loras, write_scene, tmp_path):
    film, alice = loras()
    scene = load_scene(write_scene(
        f"prompt: a\nnegative_prompt: n\nloras: [{{path: loras/{film.name}, scale: 0.5}}]\nregions:\n"
        f"  - prompt: a\n    box: [0, 0, 64, 64]\n    loras: [{{path: loras/{alice.name}}}]\n"
        "  - prompt: b\n    box: [64, 0, 128, 64]\n"
    ))
    prompts = scene_prompts(scene)
    film_set = ((str(film.resolve()), 0.5),)
    both = tuple(sorted([(str(film.resolve()), 0.5), (str(alice.resolve()), 1.0)]))
    assert list(zip(prompts.texts, prompts.adapters)) == [("a", film_set), ("n", film_set), ("a", both), ("n", both),
                                                          ("b", film_set)]
    assert prompts.cond == [0, 2, 4] and prompts.negative == [1, 3, 1]


def test_a_region_lora_after_a_render_leaves_the_model_bare_for_the_next(model, loras, write_scene):
    _, alice = loras()
    plain = load_scene(write_scene("prompt: a street\nwidth: 64\nheight: 64\nsteps: 1\n", "plain.yaml"))
    before = render(plain, model, seed=1).latents
    render(load_scene(write_scene(REGION_SCENE.format(alice=alice.name))), model, seed=1)
    assert torch.equal(render(plain, model, seed=1).latents, before)


def test_a_pickle_lora_is_refused_without_allow_pickle(model, loras, write_scene, tmp_path):
    film, _ = loras()
    from safetensors.torch import load_file

    torch.save(load_file(str(film)), tmp_path / "loras" / "film.pt")
    path = write_scene("prompt: a\nwidth: 64\nheight: 64\nsteps: 1\nloras: [{path: loras/film.pt}]\n")
    with pytest.raises(SceneError, match=r"loras\[0\]\.path: loras/film\.pt is a pickle \(\.pt\).*--allow-pickle"):
        load_scene(path)  # refused as the scene loads (validate too), before any model
    scene = load_scene(path, allow_pickle=True)
    with pytest.raises(LoraError, match=r"film\.pt: \.pt files are pickles.*--allow-pickle"):
        render(scene, model, seed=0)  # and by the render itself, whoever built the scene
    assert render(scene, model, seed=0, allow_pickle=True).latents.isfinite().all()


def test_a_lora_of_another_shape_is_one_clear_error_naming_the_file(model, write_scene, tmp_path):
    other = build_tiny_random()
    other_layers = [(part, name, torch.randn(2, down.shape[1] * 2), torch.randn(up.shape[0], 2))
                    for part, name, down, up in lora_layers(other)]
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "wide.safetensors", other_layers, "kohya")
    scene = load_scene(write_scene("prompt: a\nwidth: 64\nheight: 64\nsteps: 1\nloras: [{path: loras/wide.safetensors}]\n"))
    with pytest.raises(LoraError, match=r"wide\.safetensors: not a LoRA for this model") as caught:
        render(scene, model, seed=0)
    assert "\n" not in str(caught.value)
    assert render(scene.model_copy(update={"loras": []}), model, seed=0).latents.isfinite().all()  # model intact


def test_a_lora_for_other_modules_is_refused(model, write_scene, tmp_path):
    (tmp_path / "loras").mkdir()
    save_file({"lora_unet_down_blocks_3_attentions_9_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_3_attentions_9_proj_in.lora_up.weight": torch.zeros(8, 2)},
              str(tmp_path / "loras" / "xl.safetensors"))
    scene = load_scene(write_scene("prompt: a\nwidth: 64\nheight: 64\nsteps: 1\nloras: [{path: loras/xl.safetensors}]\n"))
    with pytest.raises(LoraError, match=r"xl\.safetensors: not a LoRA for this model"):
        render(scene, model, seed=0)


# --- from the command line ----------------------------------------------------------------------------

CLI_SCENE = """\
prompt: a street
width: 96
height: 64
steps: 2
seed: 4
loras:
  - path: loras/{film}
    scale: 0.6
regions:
  - prompt: a woman with red hair
    box: [0, 0, 48, 64]
    loras:
      - path: loras/{alice}
        scale: 0.9
  - prompt: a man
    box: [48, 0, 96, 64]
"""


def test_cli_render_records_each_lora_and_warns_when_one_changed(cli, loras, write_scene, tmp_path):
    from multidiff_cli.output.png import read_metadata

    film, alice = loras("kohya")
    scene_path = write_scene(CLI_SCENE.format(film=film.name, alice=alice.name))
    out = tmp_path / "out" / "street.png"
    result = cli("render", str(scene_path), "--model", "tiny-random", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    record = read_metadata(out)  # paths relative to the picture's folder, out/
    assert record["scene"]["loras"] == [{"path": f"../loras/{film.name}", "scale": 0.6}]
    assert record["scene"]["regions"][0]["loras"] == [{"path": f"../loras/{alice.name}", "scale": 0.9}]
    assert "loras" not in record["scene"]["regions"][1]
    assert set(record["inputs"]) == {f"../loras/{film.name}", f"../loras/{alice.name}"}
    assert all(digest.startswith("sha256:") for digest in record["inputs"].values())

    shown = cli("inspect", str(out)).stdout
    assert f"regions[0] (a woman with red hair): ../loras/{alice.name} x0.9 sha256:" in shown
    assert f"every prompt: ../loras/{film.name} x0.6 sha256:" in shown
    assert f"# ../loras/{alice.name} -> {(tmp_path / 'loras' / alice.name).resolve()}" in shown  # as found here

    write_lora(alice, lora_layers(fresh_model(), seed=9), "kohya")
    again = cli("render", str(out), "--model", "tiny-random", "--output-dir", str(tmp_path / "again"), "-q")
    assert again.exit_code == 0, again.output
    assert f"loras/{alice.name} changed since street.png was rendered" in again.stderr


def test_cli_a_lora_of_another_shape_is_exit_2_one_line_nothing_written(cli, write_scene, tmp_path):
    wide = [(part, name, torch.randn(2, down.shape[1] * 2), torch.randn(up.shape[0], 2))
            for part, name, down, up in lora_layers(build_tiny_random())]
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "wide.safetensors", wide, "peft")
    scene_path = write_scene("prompt: a\nwidth: 64\nheight: 64\nsteps: 1\nloras: [{path: loras/wide.safetensors}]\n")
    result = cli("render", str(scene_path), "--model", "tiny-random", "--output-dir", str(tmp_path / "out"), "-q")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert any("wide.safetensors: not a LoRA for this model (tiny-random" in line for line in lines), lines
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_missing_lora_file_is_a_scene_error_at_its_line(cli, write_scene, tmp_path):
    scene_path = write_scene("prompt: a\nregions:\n  - prompt: b\n    box: [0, 0, 64, 64]\n"
                             "    loras:\n      - path: loras/gone.safetensors\n")
    result = cli("validate", str(scene_path))
    assert result.exit_code == 2
    assert "scene.yaml:6: regions[0].loras[0].path: no such file" in result.stderr


def test_a_bare_lora_path_means_scale_1_and_anything_else_is_one_clear_line(cli, loras, write_scene):
    film, _ = loras()
    scene = load_scene(write_scene(f"prompt: a\nloras: [loras/{film.name}]\n"))
    assert [(lora.path, lora.scale) for lora in scene.loras] == [(f"loras/{film.name}", 1.0)]
    result = cli("validate", str(write_scene("prompt: a\nloras:\n  - 3\n", "bad.yaml")))
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("bad.yaml:3: loras[0]: a LoRA is a file path, or {path: FILE, scale: NUMBER} (got 3)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_preview_legend_names_each_regions_lora(loras, write_scene):
    from multidiff_cli.output.preview import lora_text

    film, alice = loras()
    scene = load_scene(write_scene(CLI_SCENE.format(film=film.name, alice=alice.name)))
    assert lora_text(scene.regions[0].loras) == f" [LoRA: loras/{alice.name} x0.9]"
    assert lora_text(scene.loras, "every prompt: ") == f" [LoRA: every prompt: loras/{film.name} x0.6]"
    assert lora_text(scene.regions[1].loras) == ""
    from multidiff_cli.output.preview import draw_layout

    assert draw_layout(scene).size[0] > scene.width  # the legend beside the canvas draws


def test_inspect_save_scene_rewrites_lora_paths_for_the_new_folder(tmp_path):
    from multidiff_cli.scene.paths import rebase_paths

    recorded = {
        "prompt": "a", "loras": [{"path": "loras/film.safetensors", "scale": 0.6}],
        "regions": [{"prompt": "b", "box": [0, 0, 8, 8], "loras": [{"path": "loras/alice.safetensors", "scale": 1.0}]}],
    }
    scene = rebase_paths(recorded, tmp_path / "scenes", tmp_path / "elsewhere")
    assert scene["loras"] == [{"path": "../scenes/loras/film.safetensors", "scale": 0.6}]
    assert scene["regions"][0]["loras"] == [{"path": "../scenes/loras/alice.safetensors", "scale": 1.0}]


def test_switching_leaves_peft_layers_as_its_public_api_would(model, loras):
    """switch() sets peft's layer state directly (speed): the same state as enable_adapters/set_adapter/set_scale."""
    from multidiff_cli.models.adapters import _loaded, switch
    from multidiff_cli.models.lora_files import adapter_set

    film, alice = loras()
    load_loras(model, [film, alice])
    names = {path: name for path, (_, name) in _loaded(model).files.items()}
    chosen = adapter_set([(str(film.resolve()), 0.5), (str(alice.resolve()), 1.5)])
    switch(model, chosen)
    layers = [layer for part in _loaded(model).layers.values() for layer in part]
    assert layers and all(not layer.disable_adapters for layer in layers)
    for layer in layers:
        assert layer.active_adapters == [names[path] for path, _ in chosen]
        for path, scale in chosen:
            name = names[path]
            assert layer.scaling[name] == scale * layer.lora_alpha[name] / layer.r[name]
    switch(model, ())
    assert all(layer.disable_adapters for layer in layers)
    assert not any(p.requires_grad for p in model.unet.parameters())


@pytest.mark.parametrize("scene", [
    {"regions": None}, {"loras": None}, {"loras": "x"}, {"regions": [{"loras": [{"path": 1, "scale": "big"}]}]},
    {"loras": [{"path": "a.safetensors"}], "regions": [None, {"prompt": "b", "loras": None}]},
])
def test_lora_lines_of_a_malformed_record_list_what_they_can_never_fail(scene):
    from multidiff_cli.output.report import lora_lines

    assert isinstance(lora_lines({"scene": scene, "inputs": {}}), list)
