"""Model loading through the real from_pretrained path, on tiny random SD2/SD1-shaped folders."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from multidiff_cli.errors import ModelError, ModelNotFound, UsageError
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.models.device import pick_device, pick_dtype
from multidiff_cli.models.loading import load_folder, load_model
from multidiff_cli.models.random_weights import build_tiny_random, save_model, sd2_scheduler_config
from multidiff_cli.run.render import render
from multidiff_cli.scene import load_scene

CPU = torch.device("cpu")
SMALL = "prompt: a room\nwidth: 64\nheight: 64\nsteps: 2\nbootstrap_steps: 1\nregions:\n  - prompt: a sofa\n    box: [0, 0, 32, 64]\n"


def test_a_saved_folder_loads_back_identical(tiny_folder, tiny, write_scene):
    loaded = load_model(str(tiny_folder), CPU, torch.float32)
    assert loaded.model_id == str(tiny_folder)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.tokenizer("a red sofa").input_ids == tiny.tokenizer("a red sofa").input_ids
    assert loaded.scheduler_config["prediction_type"] == "epsilon"
    scene = load_scene(write_scene(SMALL))
    built = build_tiny_random().to(CPU, torch.float32).speed_up()  # set up as the loader sets models up
    assert torch.equal(render(scene, loaded, seed=1).latents, render(scene, built, seed=1).latents)


def test_tiny_random_is_sd2_shaped_and_the_same_every_time(tiny):
    again = build_tiny_random()
    assert torch.equal(again.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert tiny.facts.cell_px == 8
    assert tiny.native_cells * tiny.facts.cell_px == 512
    assert tiny.unet.config.use_linear_projection  # SD2's transformer blocks
    assert tiny.tokenizer.model_max_length == 77


def test_v_prediction_config_is_honoured(tmp_path, write_scene):
    components = build_tiny_random()
    components.state.scheduler_config = sd2_scheduler_config("v_prediction")
    save_model(components, tmp_path / "v")
    loaded = load_model(str(tmp_path / "v"), CPU, torch.float32)
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    for name in loaded.facts.scheduler_names:
        if name == "lms":
            continue  # needs scipy, an optional extra
        assert make_scheduler(name, loaded.scheduler_config).config.prediction_type == "v_prediction", name
    scene = load_scene(write_scene(SMALL))
    v_latents = render(scene, loaded, seed=1).latents
    eps_latents = render(scene, to_cpu(build_tiny_random()), seed=1).latents
    assert not torch.equal(v_latents, eps_latents)


def to_cpu(model):
    return model.to(CPU, torch.float32)


def test_an_sd1_shaped_folder_loads_and_renders(tmp_path, write_scene):
    """SD 1.x: CLIP ViT-L-style text encoder (quick_gelu), no linear projection, a PNDM scheduler config."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    components = build_tiny_random()
    config = CLIPTextConfig(**{**components.text_encoder.config.to_dict(), "hidden_act": "quick_gelu"})
    components.text_encoder = CLIPTextModel(config)
    components.unet = UNet2DConditionModel(**{**components.unet.config, "use_linear_projection": False})
    components.state.scheduler_config = {**sd2_scheduler_config(), "_class_name": "PNDMScheduler", "skip_prk_steps": True}
    save_model(components, tmp_path / "sd1")
    loaded = load_model(str(tmp_path / "sd1"), CPU, torch.float32)
    assert not loaded.unet.config.use_linear_projection
    result = render(load_scene(write_scene(SMALL)), loaded, seed=0)
    assert torch.isfinite(result.latents).all()


def test_a_folder_that_is_not_a_diffusers_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="not a diffusers model of a family multidiff knows"):
        load_model(str(tmp_path / "empty"), CPU, torch.float32)


@pytest.mark.parametrize("model", ["./no/such/folder", "/no/such/folder", "not-a-hub-id"])
def test_a_missing_folder_is_reported_with_advice(model):
    with pytest.raises(ModelNotFound, match="--model"):
        load_model(model, CPU, torch.float32)


def test_an_uncached_hub_id_offline_is_reported_with_advice():
    # conftest sets HF_HUB_OFFLINE=1: nothing is downloaded, the cache lookup fails
    with pytest.raises(ModelNotFound, match=r"not in the local Hugging Face cache.*--model"):
        load_model("nobody-here/no-such-model", CPU, torch.float32)


def test_device_and_dtype_choice():
    assert pick_device("cpu") == CPU
    assert pick_dtype(CPU) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(CPU, "bfloat16") == torch.bfloat16
    with pytest.raises(UsageError, match="--dtype"):
        pick_dtype(CPU, "float64")
    with pytest.raises(UsageError, match="--device"):
        pick_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            pick_device("cuda")


def test_scheduler_config_keeps_the_model_s_schedule_but_never_clips():
    config = {**sd2_scheduler_config(), "clip_sample": True, "thresholding": True, "timestep_spacing": "trailing"}
    scheduler = make_scheduler("ddim", config)
    assert not scheduler.config.clip_sample and not scheduler.config.thresholding
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert json.dumps(dict(scheduler.config))  # serialisable


def test_on_the_cpu_the_loader_keeps_freed_memory_for_the_next_tensors(monkeypatch):
    from multidiff_cli.models import loading as loading_module
    calls = []
    monkeypatch.setattr(loading_module, "keep_freed_memory", lambda: calls.append("keep") or True)
    load_model("tiny-random", CPU, torch.float32)
    assert calls == ["keep"]


class FakeLibc:
    """Records mallopt and malloc_trim calls as glibc's would take them (1: done)."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_freed_memory_is_kept_by_glibcs_own_settings_and_given_back(monkeypatch):
    from multidiff_cli.models import allocator as components_module
    libc = FakeLibc()
    monkeypatch.setattr(components_module, "_glibc", lambda: libc)
    for name in [*components_module.USER_MALLOC_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD", "MULTIDIFF_KEEP_FREED_MEMORY"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # as container images set it: another setting, no conflict
    assert components_module.keep_freed_memory() is True
    components_module.release_freed_memory()
    # M_MMAP_MAX = 0: no block is mapped fresh; M_TRIM_THRESHOLD = -1: the heap is never trimmed by itself
    assert libc.calls == [("mallopt", -4, 0), ("mallopt", -1, -1), ("malloc_trim", 0)]


@pytest.mark.parametrize("variable, value", [
    ("MALLOC_MMAP_MAX_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"), ("MULTIDIFF_KEEP_FREED_MEMORY", "0"),
    ("MULTIDIFF_KEEP_FREED_MEMORY", "off"),
])
def test_a_users_own_allocator_settings_or_opting_out_leave_malloc_alone(monkeypatch, variable, value):
    from multidiff_cli.models import allocator as components_module
    libc = FakeLibc()
    monkeypatch.setattr(components_module, "_glibc", lambda: libc)
    monkeypatch.setenv(variable, value)
    assert components_module.keep_freed_memory() is False and libc.calls == []


def test_other_c_libraries_are_left_alone(monkeypatch):
    from multidiff_cli.models import allocator as components_module
    monkeypatch.setattr(components_module, "_glibc", lambda: None)  # macOS, musl, Windows
    assert components_module.keep_freed_memory() is False
    components_module.release_freed_memory()  # a no-op there


def test_glibc_is_found_on_linux_only(monkeypatch):
    from multidiff_cli.models import allocator as components_module
    found = components_module._glibc.__wrapped__()
    assert found is None or callable(found.mallopt)
    monkeypatch.setattr(components_module.sys, "platform", "darwin")
    assert components_module._glibc.__wrapped__() is None


def test_free_cpu_memory_is_read_after_giving_back_what_this_process_kept(monkeypatch):
    from multidiff_cli.models import device as device_module
    calls = []
    monkeypatch.setattr(device_module, "release_freed_memory", lambda: calls.append("release"))
    free = device_module.available_bytes(CPU)
    assert calls == ["release"] and (free is None or free > 0)


def test_a_broken_scheduler_config_is_a_model_error(tiny_folder, tmp_path):
    broken = shutil.copytree(tiny_folder, tmp_path / "broken")
    (broken / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="could not load"):
        load_folder(broken, model_id=str(broken))


@pytest.mark.parametrize("value, quiet", [("", True), ("0", True), ("false", True), ("1", False), ("yes", False)])
def test_multidiff_debug_0_keeps_the_libraries_quiet(monkeypatch, value, quiet):
    from transformers.utils import logging as transformers_logging

    from multidiff_cli.models.device import quiet_libraries

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    try:
        monkeypatch.setenv("MULTIDIFF_DEBUG", value)
        quiet_libraries()
        assert (transformers_logging.get_verbosity() == transformers_logging.ERROR) == quiet
    finally:
        transformers_logging.set_verbosity(level)
