"""Shared fixtures: no network, CPU only; the tiny random SD2- and SDXL-shaped models and their saved
folders, built once a session; the command line in this process; and the test doubles and helpers more
than one test module uses (test modules never import each other; the reference MultiDiffusion loop is
tests/reference.py)."""
from __future__ import annotations

import os
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

# Never reach a model hub from the tests, even by accident.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MULTIDIFF_DEVICE", "cpu")
# pytest-xdist's workers get COLUMNS=80: the tests read tables as a pipe without $COLUMNS prints them
os.environ.pop("COLUMNS", None)
# `make test` runs one pytest-xdist worker per core: each computes on its share of the cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """The built-in `tiny-random` components on the CPU (float32). Treat as read-only."""
    from multidiff_cli.models.random_weights import build_tiny_random

    return build_tiny_random().to(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_xl():
    """The built-in tiny SDXL components with a 128 px native window (16 latent cells, so small canvases make
    panoramas), on the CPU (float32). Treat as read-only."""
    from multidiff_cli.models.random_weights import build_tiny_sdxl_random

    return build_tiny_sdxl_random(sample_size=16).to(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """`tiny-random` saved as a diffusers folder (safetensors), loadable with --model FOLDER. Read-only:
    copy it (shutil.copytree) to change it."""
    from multidiff_cli.models.random_weights import build_tiny_random, save_model

    folder = tmp_path_factory.mktemp("models") / "tiny-sd2"
    save_model(build_tiny_random(), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_xl_folder(tmp_path_factory):
    """The tiny SDXL of `tiny_xl` saved as a diffusers folder whose name says nothing of SDXL. Read-only."""
    from multidiff_cli.models.random_weights import build_tiny_sdxl_random, save_model

    folder = tmp_path_factory.mktemp("models") / "plain-model"
    save_model(build_tiny_sdxl_random(sample_size=16), folder)
    return folder


# --- the command line ----------------------------------------------------------------------------------------


class Cli:
    """The `multidiff` command run in this process (typer's CliRunner; stdout and stderr apart)."""

    def __call__(self, *args, cwd: Path | None = None):
        """cli("validate", path, ...) -> click's Result; arguments are str()'d; cwd: run from that folder."""
        from typer.testing import CliRunner

        from multidiff_cli.cli import app

        old = Path.cwd()
        if cwd is not None:
            os.chdir(cwd)
        try:
            return CliRunner().invoke(app, [str(a) for a in args])
        finally:
            os.chdir(old)

    def render(self, *args, cwd: Path | None = None):
        """`multidiff render ARGS --model tiny-random -q`."""
        return self("render", *args, "--model", "tiny-random", "-q", cwd=cwd)


@pytest.fixture(scope="session")
def cli() -> Cli:
    """cli(*args) runs `multidiff ARGS`; cli.render(*args) renders with tiny-random, quietly."""
    return Cli()


@pytest.fixture
def bench_in_process(monkeypatch):
    """`multidiff bench` runs each path in this process instead of a spawned one (a few seconds of imports each),
    with what a spawned child is sent and sends back still made to cross as pickles. The spawning itself is
    test_bench.py's: a child that reports, and a child that dies."""
    import pickle

    from multidiff_cli.bench import command, peer, sampler

    def direct(target, *args, what=None):
        target, args = pickle.loads(pickle.dumps((target, args)))
        return pickle.loads(pickle.dumps(target(*args)))

    for module in (command, peer, sampler):
        monkeypatch.setattr(module, "in_fresh_process", direct)


@pytest.fixture
def ram_path(tmp_path):
    """A folder in memory (/dev/shm, where it is writable and has 4 GiB free; else tmp_path), removed after the
    test: for checkpoints of a GB, which take seconds to write to disk and nothing to read back."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 4 << 30):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="multidiff-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sofa_scene(tmp_path) -> Path:
    """tmp_path/my_scene.yaml: 96x64, 2 steps, seed 7, one region from the mask PNG masks/sofa.png."""
    from PIL import Image

    (tmp_path / "masks").mkdir()
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (16, 16, 80, 64))
    mask.save(tmp_path / "masks" / "sofa.png")
    path = tmp_path / "my_scene.yaml"
    path.write_text("prompt: a room\nwidth: 96\nheight: 64\nsteps: 2\nseed: 7\nregions:\n"
                    "  - prompt: a sofa\n    mask: masks/sofa.png\n")
    return path


@pytest.fixture
def render_calls(monkeypatch):
    """Spy on multidiff_cli.run.batch.render: the seeds actually rendered, in order."""
    import multidiff_cli.run.batch as batch_module

    seeds = []
    real = batch_module.render

    def spy(scene, model, seed, *args, **kwargs):
        seeds.append(seed)
        return real(scene, model, seed, *args, **kwargs)

    monkeypatch.setattr(batch_module, "render", spy)
    return seeds


@pytest.fixture
def write_scene(tmp_path):
    """Write a scene YAML into tmp_path and return its path."""

    def write(text: str, name: str = "scene.yaml"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def lamp_mask(tmp_path):
    """lamp_mask(width, height) writes masks/lamp.png in tmp_path: a region mask PNG of the canvas's size, its
    white not on whole cells (the flow families' region tests)."""
    def make(width: int, height: int):
        (tmp_path / "masks").mkdir(exist_ok=True)
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (width - 44, 4, width - 4, height - 20))
        mask.save(tmp_path / "masks" / "lamp.png")
    return make


# --- float tolerances -------------------------------------------------------------------------------

FLOAT32_ERROR = 1e-6
"""How far one float32 model output moves when computed in another order, relative to the values'
magnitude: about 8 ulps (float32's eps is 1.2e-7). Measured: tiny-random's UNet on 7 samples at once
against one at a time differs by up to 1.4e-6 of the outputs' magnitude (12 ulps); guided_atol's
`margin` covers that and more."""


def guided_atol(values: torch.Tensor, guidance: float = 0.0, steps: int = 1, margin: float = 8.0) -> float:
    """Absolute tolerance for float32 values computed twice from the same model calls in a different
    arithmetic order: batched vs one by one, fused then stepped vs stepped then fused.

    A UNet, VAE or text encoder called on a batch and on its samples one by one runs other kernels
    (other blockings and summation orders), so each output may differ by a few roundings of its
    magnitude: FLOAT32_ERROR * max(1, |values|.max()). Classifier-free guidance
    u + g(c - u) = (1 - g)u + gc adds the error of u (|1 - g| times) and of c (g times): at most
    (1 + 2g) times one output's. A sampler comparison rounds again at every model evaluation and
    carries the error on: `steps` times. `margin` is the safety factor on top. A fixed atol=1e-5 was
    too thin: batched and one-by-one UNet calls round differently on different CPUs, and guidance
    7.5 turned a 7e-7 difference into 1.08e-5 on a fresh machine (this formula allows about 2e-4 there,
    still far below what a wrong weight, prompt or guidance would change).

    guidance: the largest guidance scale applied (0 where none is); steps: model evaluations
    (len(scheduler.timesteps)). Comparisons that are exact by construction (the same ops in the
    same order) use torch.equal instead.
    """
    scale = max(1.0, float(values.detach().abs().max()))
    return margin * steps * (1 + 2 * guidance) * FLOAT32_ERROR * scale


def _assert_close_batched(actual: torch.Tensor, expected: torch.Tensor, guidance: float = 0.0, steps: int = 1,
                          margin: float = 8.0) -> None:
    """torch.testing.assert_close with atol=guided_atol(expected, guidance, steps, margin) and rtol=0."""
    torch.testing.assert_close(actual, expected, atol=guided_atol(expected, guidance, steps, margin), rtol=0)


@pytest.fixture(name="guided_atol")
def guided_atol_fixture():
    """guided_atol(values, guidance=0, steps=1): see guided_atol."""
    return guided_atol


@pytest.fixture
def assert_close_batched():
    """assert_close_batched(actual, expected, guidance=0, steps=1): assert_close within guided_atol."""
    return _assert_close_batched


# --- region masks -------------------------------------------------------------------------------------


def _box_mask(box_px, latent_hw) -> torch.Tensor:
    """A box in pixels -> float (h, w) tensor of the latent cells whose centre it holds (scene.grid.box_cells)."""
    from multidiff_cli.scene.grid import box_cells

    return torch.from_numpy(box_cells(box_px, latent_hw)).float()


@pytest.fixture
def box_mask():
    """box_mask(box_px, latent_hw) -> float (h, w) tensor of the latent cells in the box."""
    return _box_mask


# --- stand-in denoisers for the sampler ----------------------------------------------------------------


def _prompt_eps(p: int, x: torch.Tensor) -> torch.Tensor:
    """A stand-in network for prompt p: nonlinear, and mixing neighbours, so bootstrapping changes its output."""
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1)
    return torch.tanh((0.6 + 0.1 * p) * x + 0.5 * blurred + 0.2 * p)


@pytest.fixture
def prompt_eps():
    """prompt_eps(p, x): a stand-in network, one per prompt p."""
    return _prompt_eps


@pytest.fixture
def per_request_denoiser():
    """A Denoiser that runs _prompt_eps on each request's input: denoise(inputs, t, requests)."""

    def denoise(inputs, t, requests):
        return torch.stack([_prompt_eps(p, inputs[i]) for i, p in requests])

    return denoise


# --- UNet doubles -------------------------------------------------------------------------------------


class UNetDouble(torch.nn.Module):
    """Wraps a diffusers UNet, passing dtype and config through; subclasses change what a call does."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def config(self):
        return self.inner.config

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        return self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)


class CountingUNet(UNetDouble):
    """Counts the samples it runs, records each call's size and timestep."""

    def __init__(self, unet):
        super().__init__(unet)
        self.samples, self.sizes, self.timesteps = 0, [], []

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        self.samples += sample.shape[0]
        self.sizes.append(sample.shape[0])
        self.timesteps.append(float(timestep))
        return super().forward(sample, timestep, encoder_hidden_states, **kwargs)


class OutOfMemoryUNet(CountingUNet):
    """Runs out of 'GPU memory' (torch.cuda.OutOfMemoryError) on calls of more than `limit` samples;
    `sizes` records the calls that ran."""

    def __init__(self, unet, limit: int):
        super().__init__(unet)
        self.limit = limit

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        if sample.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(sample, timestep, encoder_hidden_states, **kwargs)


class NaNUNet(UNetDouble):
    """Its first `good_calls` calls are real; every later call returns NaN (a float16 overflow, say)."""

    def __init__(self, unet, good_calls: int):
        super().__init__(unet)
        self.good_calls, self.calls = good_calls, 0

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        self.calls += 1
        out = super().forward(sample, timestep, encoder_hidden_states, **kwargs).sample
        if self.calls > self.good_calls:
            out = torch.full_like(out, float("nan"))
        return types.SimpleNamespace(sample=out)


def unet_run(unet, samples_per_call: int | None = None, warn=None):
    """A UNet (or a double) over a step's samples in chunked calls, conditioned on raw (B, 77, D) hidden
    states: SD's family call (models/sd.py SD.forward) without the model around it."""
    from multidiff_cli.models.batching import FALLBACK_SAMPLES_PER_CALL, ChunkedRun

    def forward(inputs, t, hidden):
        return unet(inputs.to(unet.dtype), t, encoder_hidden_states=hidden).sample.float()

    return ChunkedRun(forward, samples_per_call or FALLBACK_SAMPLES_PER_CALL, warn)


@pytest.fixture
def unet_doubles():
    """The UNet test doubles: .Counting(unet), .OutOfMemory(unet, limit), .NaN(unet, good_calls); and
    .run(unet, samples_per_call, warn): a UNet over a step's samples in chunks, on raw hidden states."""
    return types.SimpleNamespace(Counting=CountingUNet, OutOfMemory=OutOfMemoryUNet, NaN=NaNUNet, run=unet_run)


# --- the batch around a render ------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the batch loads a model; the list of attempted loads (empty if none)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("multidiff_cli.models.loading.load_model", refuse)
    return calls


LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _ldm_unet_key(key: str, config) -> str:
    """A diffusers UNet key -> the original (LDM) one: input_blocks / middle_block / output_blocks."""
    per_block = config.layers_per_block
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]

    def resnet(rest: str) -> str:
        name, tail = rest.split(".", 1)
        return f"{LDM_RESNET[name]}.{tail}"

    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = (per_block + 1) * i + j + 1
        return f"input_blocks.{block}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(per_block + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = (per_block + 1) * i + j
        return f"output_blocks.{block}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        has_attention = "CrossAttn" in config.up_block_types[i]
        return f"output_blocks.{(per_block + 1) * i + per_block}.{2 if has_attention else 1}.conv.{m[2]}"
    raise AssertionError(f"no original name for UNet key {key}")


@pytest.fixture(scope="session")
def ldm_unet_key():
    """ldm_unet_key(key, unet_config) -> the original (LDM/SGM) name of a diffusers UNet key or module:
    what single-file checkpoints and kohya's SDXL LoRAs use."""
    return _ldm_unet_key
