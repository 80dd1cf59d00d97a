"""LoRAs as adapters on the denoiser: loaded once per model (diffusers' LoRA loading and kohya/A1111
conversion, through peft), and applied per *adapter set* — the LoRAs, with their scales, that one
condition's samples run with.

The sampler never hears of LoRAs. Each condition (a distinct text with its adapter set) is one
row of the conditioning; `Conditions` carries each row's set along with its hidden states, and
`AdapterUNet` runs the rows of each set together with that set switched on (MultiDiffusion runs
every prompt's prediction as its own UNet sample, so a region's LoRA touches its samples alone).
Text conditions are encoded with their set's text-encoder LoRA switched on.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraError
from .components import Components

AdapterSet = tuple[tuple[str, float], ...]
"""(LoRA file as an absolute path, scale) pairs, sorted by file; () is the bare model."""

PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin")
TEXT_PARTS = ("text_encoder", "text_encoder_2")  # SDXL has two text encoders; SD has the first alone
PARTS = ("unet", *TEXT_PARTS)  # the Components a LoRA adapts
_DOWN_KEY = re.compile(r"(lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")


def adapter_set(loras: list[tuple[str, float]]) -> AdapterSet:
    """LoRA (file, scale) pairs as one set: a file given twice adds its scales; order does not matter."""
    scales: dict[str, float] = {}
    for path, scale in loras:
        scales[path] = scales.get(path, 0.0) + scale
    return tuple(sorted(scales.items()))


def read_lora_file(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors: safetensors, or a pickle (.pt/.ckpt/.bin) only with allow_pickle."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise LoraError(f"LoRA {path}: {suffix} files are pickles, which can run code when loaded; use a "
                        ".safetensors LoRA, or, for a file you trust, pass --allow-pickle")
    try:
        if suffix in PICKLE_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        else:
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
    except Exception as exc:  # truncated, not safetensors, not a tensor dict
        raise LoraError(f"LoRA {path}: cannot read it as a {suffix or 'weights'} file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoraError(f"LoRA {path}: holds no LoRA weights (not a dict of tensors)")
    return state


@dataclass
class _Loaded:
    """The LoRAs loaded into a model: file -> (its size and time when loaded, adapter name), and the
    peft layers they live in (found once per load: walking every module at each switch would cost)."""

    files: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)
    layers: dict[str, list] = field(default_factory=dict)  # "unet" / "text_encoder" -> its peft layers
    count: int = 0  # adapters loaded so far: each gets a fresh name


def _loaded(components: Components) -> _Loaded:
    if components.lora_state is None:
        components.lora_state = _Loaded()
    return components.lora_state


def load_loras(components: Components, paths: list[Path], allow_pickle: bool = False) -> None:
    """Load every LoRA file not loaded yet into the UNet and the text encoder, as a peft adapter, all
    switched off. A file that is no LoRA of this model (another family, another shape) is a LoraError
    naming it, and leaves the model as it was. A file edited since it was loaded loads anew."""
    loaded = _loaded(components)
    for path in paths:
        try:
            stat = path.stat()
        except OSError as exc:  # gone since the scene was checked
            raise LoraError(f"LoRA {path}: cannot read it ({exc.strerror or exc})") from None
        stamp, key = (stat.st_size, stat.st_mtime_ns), str(path.resolve())
        if key in loaded.files and loaded.files[key][0] == stamp:
            continue
        if key in loaded.files:
            _delete(components, loaded.files.pop(key)[1])
        name, loaded.count = f"multidiff_{loaded.count}", loaded.count + 1
        _load_one(components, path, name, allow_pickle)
        loaded.files[key] = (stamp, name)
        loaded.layers = {part: _tuner_layers(components, (part,)) for part in PARTS}
    switch(components, ())


def _load_one(components: Components, path: Path, name: str, allow_pickle: bool) -> None:
    """One LoRA file into the UNet and each text encoder, through the family's diffusers pipeline class
    (SDXL: kohya files name the UNet's blocks as Stability's code does, mapped by the UNet's config)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    state = read_lora_file(path, allow_pickle)
    expected = sum(1 for key in state if _DOWN_KEY.search(key))
    sdxl = components.family == "sdxl"
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    report: list[str] = []
    with warnings.catch_warnings(), _loaders_quiet(report):
        warnings.simplefilter("ignore")  # peft: "Already found a peft_config attribute" (several LoRAs, on purpose)
        try:
            converted, alphas = pipeline.lora_state_dict(state, **({"unet_config": components.unet.config} if sdxl else {}))
            if not converted or not all("lora" in key for key in converted):
                raise ValueError("no LoRA layers in it")
            pipeline.load_lora_into_unet(converted, alphas, components.unet, adapter_name=name)
            for part in TEXT_PARTS:
                if getattr(components, part) is not None:  # the bench runs without one
                    pipeline.load_lora_into_text_encoder(
                        converted, alphas, getattr(components, part), prefix=part, adapter_name=name
                    )
            loaded = sum(name in getattr(layer, "lora_A", {}) for layer in _tuner_layers(components))
            if loaded < expected and components.text_encoder_2 is None and any(
                    key.startswith("text_encoder_2.") for key in converted):
                raise ValueError("it has layers for a second text encoder (text_encoder_2), which SDXL models "
                                 "have and this one does not: an SDXL LoRA?")
            if expected == 0 or loaded < expected:
                raise ValueError(f"{expected - loaded} of its {expected} layers match no layer of this model"
                                 if expected else "no LoRA layers in it")
        except Exception as exc:
            _delete(components, name)
            raise LoraError(f"LoRA {path}: not a LoRA for this model ({components.model_id}, "
                            f"{_model_family(components)}): {_reason(exc, name, report)}") from None
    for module in _modules(components):
        module.to(components.device, components.dtype).requires_grad_(False)


def _reason(exc: Exception, name: str, report: list[str]) -> str:
    """The first telling line of a loading error: a size mismatch names the layer and both shapes
    (diffusers' UNet error says it; for a text encoder, transformers' load report does)."""
    text = str(exc).replace(f".{name}.", ".")
    mismatch = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[\d, ]*\])\) from "
                         r"checkpoint, the shape in current model is torch.Size\((\[[\d, ]*\])\)", text)
    if mismatch is None and "ignore_mismatched_sizes" in text:
        rows = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(report)).replace(f".{name}.", ".")  # no colour codes
        mismatch = re.search(r"^\s*(.+?)\s*\|\s*MISMATCH\s*\|.*ckpt: torch.Size\((\[[\d, ]*\])\) vs model: ?"
                             r"torch.Size\((\[[\d, ]*\])\)", rows, re.MULTILINE)
    if mismatch:
        layer, theirs, ours = mismatch.groups()
        return f"{layer} is {theirs} in the file, {ours} in the model"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().splitlines()


@contextlib.contextmanager
def _loaders_quiet(report: list[str]):
    """diffusers logs a failed LoRA load at length before raising, and transformers a text encoder's
    load report: the LoraError says it in one line, so both stay off the terminal; transformers'
    report lines are kept in `report` (they name a mismatched text-encoder layer)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    logger = logging.getLogger("transformers")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers, logger.propagate = [_Collect(report)], False
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])


def _model_family(components: Components) -> str:
    if components.family == "sdxl":
        return "SDXL-shaped"
    width = components.unet.config.cross_attention_dim
    return {768: "SD 1.x-shaped", 1024: "SD 2.x-shaped"}.get(width, f"{width}-wide cross attention")


def _modules(components: Components, parts: tuple[str, ...] = PARTS) -> list[torch.nn.Module]:
    """The modules of `parts` these components have (SD has no second text encoder, the bench no first)."""
    return [getattr(components, part) for part in parts if getattr(components, part, None) is not None]


def _tuner_layers(components: Components, parts: tuple[str, ...] = PARTS) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for module in _modules(components, parts) for layer in module.modules()
            if isinstance(layer, BaseTunerLayer)]


def _delete(components: Components, name: str) -> None:
    """Remove adapter `name` wherever it was injected (a failed load leaves the model as it was)."""
    for layer in _tuner_layers(components):
        if name in getattr(layer, "lora_A", {}):
            layer.delete_adapter(name)
    for module in _modules(components):
        getattr(module, "peft_config", {}).pop(name, None)


def switch(components: Components, adapters: AdapterSet, parts: tuple[str, ...] = PARTS) -> None:
    """Switch the LoRA layers of `parts` (the UNet's, the text encoders') to `adapters`, each at its
    scale; () turns every LoRA off, which leaves exactly the bare model's computation.

    This runs a few times every step, so it sets peft's per-layer state directly (peft is pinned):
    `enable_adapters` and `set_adapter` also walk every LoRA weight's requires_grad, which made a
    switch cost about 3x as much on SD2's 128 attention projections. The LoRA weights are frozen once
    at loading, so there is nothing for those walks to do."""
    loaded = _loaded(components)
    names = [loaded.files[path][1] for path, _ in adapters]
    for layer in (layer for part in parts for layer in loaded.layers.get(part, [])):
        layer._disable_adapters = not names  # what enable_adapters sets, less the requires_grad walk
        if names:
            layer._active_adapter = names  # what set_adapter sets, likewise
            for name, (_, scale) in zip(names, adapters):
                layer.set_scale(name, scale)  # scale * lora_alpha / r (rsLoRA: / sqrt(r)); absent: ignored


@dataclass
class Conditions:
    """Text conditioning whose rows each run with an adapter set: the family's conditioning of E rows
    (SD's hidden states (E, L, D), or SDXL's SDXLConditioning) and each row's index into `sets`.
    Slices like a tensor of rows; AdapterUNet hands each set's rows of `hidden` to the UNet."""

    hidden: Any  # torch.Tensor or an object that slices like one and has unet_kwargs()
    set_index: torch.Tensor  # (E,) long, on the CPU
    sets: list[AdapterSet]

    def __getitem__(self, rows) -> Conditions:
        return Conditions(self.hidden[rows], self.set_index[rows], self.sets)

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    def zeroed(self, rows: frozenset[int]) -> Conditions:
        """These rows' conditioning zeroed (SDXL's force_zeros_for_empty_prompt: SDXLConditioning.zeroed)."""
        return Conditions(self.hidden.zeroed(rows), self.set_index, self.sets)


def encode_conditions(components: Components, texts: list[str], sets: list[AdapterSet], encode) -> Conditions:
    """Each condition (texts[i] under sets[i]) encoded with its set's text-encoder LoRAs on.

    encode: (components, texts) -> the family's conditioning of those texts, rows in order: SD's
    (E, L, D) hidden states, or a conditioning object with `cat` and tensor-like row indexing (SDXL)."""
    table = list(dict.fromkeys(sets))
    index = torch.tensor([table.index(s) for s in sets], dtype=torch.long)
    parts, order = [], []
    try:
        for k, adapters in enumerate(table):
            rows = [i for i in range(len(texts)) if index[i] == k]
            switch(components, adapters, TEXT_PARTS)
            parts.append(encode(components, [texts[i] for i in rows]))
            order += rows
    finally:
        switch(components, (), TEXT_PARTS)
    encoded = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else type(parts[0]).cat(parts)
    back = torch.tensor(order).argsort()  # encoded row j holds condition order[j]
    return Conditions(encoded[back.to(encoded.device)], index, table)


class AdapterUNet:
    """Runs each adapter set's samples as one group (in ChunkedUNet's calls) with that set switched on."""

    def __init__(self, run, components: Components):
        self.run, self.components = run, components
        self.switches, self.switch_seconds = 0, 0.0  # what switching sets cost (multidiff bench --loras)

    @property
    def samples_per_call(self) -> int:
        return self.run.samples_per_call

    def __call__(self, inputs: torch.Tensor, t: torch.Tensor, conds: Conditions) -> torch.Tensor:
        out, bare = None, False
        groups = sorted(torch.unique(conds.set_index).tolist(), key=lambda k: not conds.sets[k])  # the bare set last
        try:
            for k in groups:
                rows = (conds.set_index == k).nonzero().flatten()
                self._switch(conds.sets[k])
                bare = not conds.sets[k]
                part = self.run(inputs[rows.to(inputs.device)], t, conds.hidden[rows.to(conds.hidden.device)])
                if out is None:
                    out = part.new_empty((inputs.shape[0], *part.shape[1:]))
                out[rows.to(out.device)] = part
        finally:
            if not bare:  # the UNet is left bare after every call, as the rest of multidiff expects it
                self._switch(())
        return out

    def _switch(self, adapters: AdapterSet) -> None:
        started = time.perf_counter()
        switch(self.components, adapters, ("unet",))
        self.switches += 1
        self.switch_seconds += time.perf_counter() - started
