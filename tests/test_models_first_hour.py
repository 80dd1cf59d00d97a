"""What a user meets in the first hour: tiny-random's token counts, device and dtype errors that name
where the value came from, `models` on a Hugging Face cache, and which models are few-step ones."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from multidiff_cli.errors import ModelError, UsageError
from multidiff_cli.models.device import pick_device, pick_dtype
from multidiff_cli.models.family import LoadedState
from multidiff_cli.models.loading import cached_models, is_few_step_model, load_model, load_folder
from multidiff_cli.models.names import CLIP_CONTRACTIONS, TOKENIZER_WORDS
from multidiff_cli.models.random_weights import TINY_RANDOM, build_tiny_random, save_model, tiny_tokenizer
from multidiff_cli.scene import load_scene

CPU = torch.device("cpu")
SCENES = sorted((Path(__file__).resolve().parents[1] / "scenes").glob("*.yaml"))
VAN_GOGH_SKY = "the sky over a town, painted in the style of Van Gogh's Starry Night, swirling brush strokes"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-sd2"
    save_model(build_tiny_random(), folder)
    return folder


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


# --- A. tiny-random's tokenizer counts tokens like SD2's CLIP BPE ------------------------------------------


def test_every_listed_word_and_contraction_is_one_token(tiny):
    for word in TOKENIZER_WORDS + CLIP_CONTRACTIONS:
        assert token_count(tiny.tokenizer, word) == 1, word
        assert token_count(tiny.tokenizer, word.upper()) == 1, word  # CLIP lowercases first


def test_a_prompt_costs_one_token_per_listed_word_and_per_punctuation_mark(tiny):
    # 17 words, 2 commas, 's: the byte-level tokenizer made 78 tokens of this and warned
    assert token_count(tiny.tokenizer, VAN_GOGH_SKY) == 17 + 2 + 1


@pytest.mark.parametrize("path", SCENES, ids=lambda path: path.name)
def test_no_shipped_scene_warns_of_a_long_prompt(tiny, path):
    scene = load_scene(path)
    texts = [("prompt", scene.full_prompt(scene.prompt)), ("negative_prompt", scene.negative_prompt)]
    for i, region in enumerate(scene.regions):
        texts.append((f"regions[{i}].prompt", scene.full_prompt(region.prompt)))
        texts.append((f"regions[{i}].negative_prompt", region.negative_prompt or ""))
    assert tiny.truncation_warnings(texts) == []


def test_a_100_word_prompt_warns_with_both_counts(tiny):
    words = " ".join(TOKENIZER_WORDS[i * 7 % len(TOKENIZER_WORDS)] for i in range(100))
    (note,) = tiny.truncation_warnings([("regions[2].prompt", words)])
    assert note.startswith("regions[2].prompt is 100 tokens, over the text encoder's 75 (77 with the start and end "
                           "tokens): cut after '...")
    assert "\n" not in note


def test_unlisted_words_still_encode_in_pieces(tiny):
    assert token_count(tiny.tokenizer, "harbours") in (2, 3, 4)  # "harbour" is listed, the plural is not
    assert token_count(tiny.tokenizer, "zxqv") == 4
    assert token_count(tiny.tokenizer, "café ☕") >= 3  # byte-level: any text encodes, nothing is unknown
    assert tiny.tokenizer.unk_token_id not in tiny.tokenizer("café ☕ zxqv", add_special_tokens=False).input_ids


@pytest.mark.parametrize("one, other", [
    ("a red velvet sofa", "a blue velvet sofa"),
    ("a red velvet sofa", "a velvet red sofa"),
    ("a zxqv", "a zxqw"),  # unlisted words too
    ("a photo", "a photo,"),
])
def test_different_prompts_give_different_ids(tiny, one, other):
    assert tiny.tokenizer(one).input_ids != tiny.tokenizer(other).input_ids


def test_the_tokenizer_is_built_the_same_every_time():
    first, second = tiny_tokenizer(), tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_the_text_encoder_has_one_embedding_per_token(tiny):
    assert tiny.text_encoder.config.vocab_size == len(tiny.tokenizer)
    assert len(tiny_tokenizer()) <= 49408  # sd2-random's text encoder has SD2's 49408 embeddings


def test_the_tokenizer_round_trips_through_a_folder(tiny, tiny_folder):
    from transformers import CLIPTokenizer

    loaded = CLIPTokenizer.from_pretrained(tiny_folder, subfolder="tokenizer")
    assert len(loaded) == len(tiny.tokenizer)
    texts = [VAN_GOGH_SKY, "harbours, zxqv; café ☕!", "a 360 degree panorama", " ".join(TOKENIZER_WORDS)]
    for text in texts:
        assert loaded(text).input_ids == tiny.tokenizer(text).input_ids, text
    padded = loaded([VAN_GOGH_SKY], padding="max_length", max_length=77, truncation=True).input_ids
    assert padded == tiny.tokenizer([VAN_GOGH_SKY], padding="max_length", max_length=77, truncation=True).input_ids


# --- B. --device / $MULTIDIFF_DEVICE and --dtype errors: the source, the value, the choices ---------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("name, source, message", [
    ("gpu", "--device", "--device: 'gpu' is not a device; choose cpu, cuda, cuda:N or mps"),
    ("meta", "--device", "--device: 'meta' is not a device; choose cpu, cuda, cuda:N or mps"),
    ("cuda", "$MULTIDIFF_DEVICE", "$MULTIDIFF_DEVICE: 'cuda' asked for CUDA, but torch sees no CUDA device here; "
                                  "choose cpu (or leave it unset for the best present)"),
    ("cuda:1", "--device", "--device: 'cuda:1' asked for CUDA, but torch sees no CUDA device here; "
                           "choose cpu (or leave it unset for the best present)"),
    ("mps", "$MULTIDIFF_DEVICE", "$MULTIDIFF_DEVICE: 'mps' asked for Apple MPS, but it is not available here; "
                                 "choose cpu (or leave it unset for the best present)"),
])
def test_a_device_error_names_its_source_and_the_choices_on_one_line(no_gpu, name, source, message):
    with pytest.raises(UsageError) as caught:
        pick_device(name, source=source)
    assert str(caught.value) == message
    assert caught.value.exit_code == 2


def test_a_missing_cuda_index_names_the_devices_there_are(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError) as caught:
        pick_device("cuda:2")
    assert str(caught.value) == ("--device: 'cuda:2' asked for CUDA device 2, but torch sees 2 (cuda:0 to cuda:1); "
                                 "choose cpu or cuda:0 to cuda:1 (or leave it unset for the best present)")
    assert pick_device("cuda:1") == torch.device("cuda:1")


def test_devices_that_are_present_are_picked(no_gpu):
    assert pick_device("cpu", source="$MULTIDIFF_DEVICE") == CPU
    assert pick_device(None) == CPU
    assert pick_device("") == CPU


@pytest.mark.parametrize("source", ["--dtype", "$MULTIDIFF_DTYPE"])
def test_a_dtype_error_names_its_source_and_the_choices(source):
    with pytest.raises(UsageError) as caught:
        pick_dtype(CPU, "fp16", source=source)
    assert str(caught.value) == f"{source}: 'fp16' is not a dtype; choose float32, float16 or bfloat16"
    assert caught.value.exit_code == 2
    assert pick_dtype(CPU, "bfloat16", source=source) == torch.bfloat16


# --- C. models --cache-dir: the hub cache or HF_HOME ------------------------------------------------------


def cache_snapshot(hub: Path, repo: str, sha: str, files: dict[str, bytes], kind: str = "models") -> Path:
    """A revision laid out as huggingface_hub caches it: <kind>--owner--name/ with blobs/<hash> holding
    the bytes, snapshots/<sha>/<path> links into blobs, and refs/main naming the sha."""
    repo_dir = hub / f"{kind}--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    snapshot = repo_dir / "snapshots" / sha
    for i, (path, data) in enumerate(sorted(files.items())):
        blob = repo_dir / "blobs" / f"{i:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(path).parts) + 1), "blobs", blob.name))  # up to repo_dir
    return snapshot


DIFFUSERS_FILES = {
    "model_index.json": b"{}",
    "scheduler/scheduler_config.json": b"{}",
    "tokenizer/vocab.json": b"{}",
    "text_encoder/config.json": b"{}",
    "text_encoder/model.safetensors": b"x" * 100,
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": b"x" * 1000,
    "vae/config.json": b"{}",
    "vae/diffusion_pytorch_model.safetensors": b"x" * 10,
}


@pytest.fixture
def hf_home(tmp_path):
    """An HF_HOME with hub/: one loadable model, one pickle-only, a text model and a dataset (not listed)."""
    hub = tmp_path / "hf-home" / "hub"
    cache_snapshot(hub, "me/good-sd", "a" * 40, DIFFUSERS_FILES)
    pickled = {k: v for k, v in DIFFUSERS_FILES.items() if not k.startswith("unet/diff")}
    cache_snapshot(hub, "me/pickled-sd", "b" * 40, {**pickled, "unet/diffusion_pytorch_model.bin": b"pickle"})
    cache_snapshot(hub, "me/text-model", "c" * 40, {"config.json": b"{}"})
    cache_snapshot(hub, "me/images", "d" * 40, DIFFUSERS_FILES, kind="datasets")
    (tmp_path / "hf-home" / "token").write_text("not read")  # HF_HOME holds more than hub/
    return tmp_path / "hf-home"


def test_the_hub_cache_and_an_hf_home_holding_it_list_the_same(hf_home):
    from huggingface_hub import scan_cache_dir

    hub = hf_home / "hub"
    assert scan_cache_dir(hub).warnings == []  # the fake cache is laid out as huggingface_hub expects
    for given in (hub, hf_home):
        found = cached_models(given)
        assert found.folder == hub
        assert [row[:2] for row in found.rows] == [("me/good-sd", "a" * 40), ("me/pickled-sd", "b" * 40)]
        good, pickled = found.rows
        assert good[2] == sum(len(data) for data in DIFFUSERS_FILES.values()) and good[3] is None
        assert "diffusion_pytorch_model.bin" in pickled[3] and "safetensors" in pickled[3]


def test_a_saved_model_in_the_cache_lists_as_loadable(tiny, tmp_path):
    snapshot = cache_snapshot(tmp_path / "hub", "me/tiny-sd", "e" * 40, {"model_index.json": b"{}"})
    save_model(tiny, snapshot)
    (found,) = cached_models(tmp_path).rows
    assert found[0] == "me/tiny-sd" and found[3] is None


@pytest.mark.parametrize("make", ["missing", "file"])
def test_a_cache_dir_that_is_no_folder_is_a_usage_error_naming_it(tmp_path, make):
    given = tmp_path / "no-such-cache"
    if make == "file":
        given.write_text("")
    with pytest.raises(UsageError, match=f"--cache-dir: .*{given.name}") as caught:
        cached_models(given)
    assert caught.value.exit_code == 2


def test_an_empty_cache_dir_lists_nothing(tmp_path):
    assert cached_models(tmp_path) == type(cached_models(tmp_path))(tmp_path, [])


def test_the_default_cache_not_yet_made_lists_nothing(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "never-downloaded"))
    found = cached_models()
    assert (found.folder, found.rows) == (tmp_path / "never-downloaded", [])


# --- D. few-step (distilled) models ------------------------------------------------------------------------


@pytest.mark.parametrize("model_id, few_step", [
    ("me/sd-turbo-copy", True),
    ("me/SDXL-Turbo", True),
    ("me/my-LCM_dreamshaper", True),
    ("me/sdxl-lightning-4step", True),
    ("me/Hyper-SD15", True),
    ("me/hyper_sd", True),
    ("./models/sd-turbo", True),
    (TINY_RANDOM, False),
    ("sd2-random", False),
    ("me/stable-diffusion-2-base", False),
    ("me/turbine-painter", False),
    ("/home/lcm-user/models/plain-sd", False),  # only the model's own name counts, not the folders above
])
def test_few_step_models_are_known_by_name(model_id, few_step):
    assert is_few_step_model(model_id) is few_step


def write_configs(folder: Path, model_index=None, scheduler=None) -> Path:
    (folder / "scheduler").mkdir(parents=True)
    if model_index is not None:
        (folder / "model_index.json").write_text(json.dumps(model_index))
    if scheduler is not None:
        text = scheduler if isinstance(scheduler, str) else json.dumps(scheduler)
        (folder / "scheduler" / "scheduler_config.json").write_text(text)
    return folder


@pytest.mark.parametrize("model_index, scheduler, few_step", [
    (None, None, False),
    ({"_class_name": "StableDiffusionPipeline"}, {"_class_name": "DDIMScheduler"}, False),
    ({"_name_or_path": "me/sd-turbo"}, None, True),
    (None, {"_class_name": "EulerDiscreteScheduler", "_name_or_path": "me/SDXL-Lightning"}, True),
    (None, {"_class_name": "LCMScheduler"}, True),
    (["not", "an", "object"], "{broken json", False),
])
def test_few_step_models_are_known_by_their_configs(tmp_path, model_index, scheduler, few_step):
    folder = write_configs(tmp_path / "plain", model_index, scheduler)
    assert is_few_step_model(str(folder), folder) is few_step


def test_a_hub_snapshot_is_known_by_its_repo_name(tmp_path):
    snapshot = write_configs(tmp_path / "hub" / "models--me--sd-turbo" / "snapshots" / ("f" * 40))
    assert is_few_step_model(str(snapshot), snapshot)
    other = write_configs(tmp_path / "hub" / "models--lcm-fans--plain-sd" / "snapshots" / ("f" * 40))
    assert not is_few_step_model(str(other), other)


def test_loading_sets_few_step_model(tiny_folder, tmp_path):
    assert LoadedState(model_id="x", scheduler_config={}).few_step_model is False
    assert load_model(TINY_RANDOM, CPU, torch.float32).few_step_model is False
    assert load_folder(tiny_folder, model_id=str(tiny_folder)).few_step_model is False
    turbo = shutil.copytree(tiny_folder, tmp_path / "tiny-turbo")
    assert load_folder(turbo, model_id=str(turbo)).few_step_model is True
    lcm = shutil.copytree(tiny_folder, tmp_path / "tiny-lcm-free")  # a name says so, the scheduler need not
    assert load_model(str(lcm), CPU, torch.float32).few_step_model is True


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
