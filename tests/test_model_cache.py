"""`multidiff models` and the Hugging Face cache: what it lists (family, size, what cannot load), its
tab-separated rows, --cache-dir as the hub cache or an HF_HOME holding it, and missing or empty caches."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from multidiff_cli.errors import UsageError
from multidiff_cli.models.loading import cached_models


def lines_of(text: str) -> list[str]:
    return text.strip().splitlines()


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


def test_a_saved_model_in_the_cache_lists_as_loadable(tiny_folder, tmp_path):
    snapshot = cache_snapshot(tmp_path / "hub", "me/tiny-sd", "e" * 40, {"model_index.json": b"{}"})
    shutil.copytree(tiny_folder, snapshot, dirs_exist_ok=True)  # as save_model writes it, through the blob link
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


# --- the command ----------------------------------------------------------------------------------------


def test_models_lists_the_cache_and_what_cannot_load(cli, tiny_folder, tmp_path):
    cache = tmp_path / "hub"
    good_sha, bad_sha = "a" * 40, "0123456789abcdef" * 2 + "01234567"
    good = cache_snapshot(cache, "me/tiny-sd", good_sha, {})
    shutil.copytree(tiny_folder, good)
    (good / "model_index.json").write_text("{}")
    bad = cache_snapshot(cache, "me/pickled-sd", bad_sha, {})
    shutil.copytree(good, bad)
    for weights in (bad / "unet").glob("*.safetensors"):
        weights.unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    # A non-diffusers model is not listed.
    other = cache_snapshot(cache, "me/a-text-model", "b" * 40, {})
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")

    result = cli("models", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    # Fields: repo id, revision (12 hex), size "N.N GB", family, status.
    by_repo = {fields[0]: fields for fields in (line.split(None, 5) for line in lines)}
    assert sorted(by_repo) == ["me/pickled-sd", "me/tiny-sd"]
    repo, revision, size, unit, family, status = by_repo["me/tiny-sd"]
    assert (revision, unit, family, status) == (good_sha[:12], "GB", "sd", "ok") and float(size) >= 0
    repo, revision, size, unit, family, status = by_repo["me/pickled-sd"]
    assert revision == bad_sha[:12]
    assert status.startswith("cannot load") and "safetensors" in status and "diffusion_pytorch_model.bin" in status


@pytest.fixture
def tiny_cache(tiny_folder, tmp_path):
    good = cache_snapshot(tmp_path / "hub", "me/tiny-sd", "c" * 40, {})
    shutil.copytree(tiny_folder, good)
    (good / "model_index.json").write_text("{}")
    return tmp_path / "hub"


def test_models_output_is_tab_separated(cli, tiny_cache):
    """For cut -f / awk -F'\\t': the fields are joined by tabs, not padded with spaces."""
    result = cli("models", "--cache-dir", tiny_cache)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split("\t") == ["me/tiny-sd", "c" * 12, "0.0 GB", "sd", "ok"]


def test_models_with_an_empty_cache_prints_nothing_on_stdout(cli, tmp_path):
    cache = tmp_path / "empty-hub"
    cache.mkdir()
    result = cli("models", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "no diffusers models" in result.stderr


def test_models_with_a_missing_cache_folder_is_a_usage_error(cli, tmp_path):
    cache = tmp_path / "no-such-hub"
    result = cli("models", "--cache-dir", cache)
    assert result.exit_code == 2, result.output
    assert lines_of(result.stderr) == [f"error: --cache-dir: no such folder: {cache}"] and result.stdout == ""


def test_models_names_the_folder_it_searched_and_refuses_a_missing_one(cli, tmp_path):
    missing = cli("models", "--cache-dir", tmp_path / "nowhere")
    assert missing.exit_code == 2 and str(tmp_path / "nowhere") in missing.stderr
    (tmp_path / "home" / "hub").mkdir(parents=True)
    empty = cli("models", "--cache-dir", tmp_path / "home")
    assert empty.exit_code == 0 and empty.stdout == ""
    assert f"searched {tmp_path / 'home' / 'hub'}: no diffusers models there" in empty.stderr
