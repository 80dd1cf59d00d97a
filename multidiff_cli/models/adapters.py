"""LoRAs as peft adapters on a model's networks: loaded once per model (through the family's diffusers
LoRA loading and kohya/A1111 conversion), and switched per *adapter set* — the LoRAs, with their
scales, that one condition's samples run with.

The sampler never hears of LoRAs. Each condition (a distinct text with its adapter set) is one
row of the Conditioning, which carries each row's set; `AdapterRun` runs the rows of each set
together with that set switched on (MultiDiffusion runs every prompt's prediction as its own
sample, so a region's LoRA touches its samples alone). Text conditions are encoded with their set's
text-encoder LoRAs switched on.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import LoraError
from .conditioning import AdapterSet, Conditioning
from .lora_files import read_lora_file

if TYPE_CHECKING:
    from .family import Model

_DOWN_KEY = re.compile(r"(lora_A|lora_down|lora\.down|lora_linear_layer\.down|lora\d\.down)\.weight$")  # XLabs: qkv_lora1.down


@dataclass
class _Loaded:
    """The LoRAs loaded into a model: file -> (its size and time when loaded, adapter name), and the
    peft layers they live in (found once per load: walking every module at each switch would cost)."""

    files: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)
    layers: dict[str, list] = field(default_factory=dict)  # part ("unet", "text_encoder") -> its peft layers
    count: int = 0  # adapters loaded so far: each gets a fresh name


def _loaded(model: Model) -> _Loaded:
    if model.state.lora_state is None:
        model.state.lora_state = _Loaded()
    return model.state.lora_state


def load_loras(model: Model, paths: list[Path], allow_pickle: bool = False) -> None:
    """Load every LoRA file not loaded yet into the denoiser and the text encoders, as a peft adapter, all
    switched off. A file that is no LoRA of this model (another family, another shape) is a LoraError
    naming it, and leaves the model as it was. A file edited since it was loaded loads anew."""
    loaded = _loaded(model)
    for path in paths:
        try:
            stat = path.stat()
        except OSError as exc:  # gone since the scene was checked
            raise LoraError(f"LoRA {path}: cannot read it ({exc.strerror or exc})") from None
        stamp, key = (stat.st_size, stat.st_mtime_ns), str(path.resolve())
        if key in loaded.files and loaded.files[key][0] == stamp:
            continue
        if key in loaded.files:
            _delete(model, loaded.files.pop(key)[1])
        name, loaded.count = f"multidiff_{loaded.count}", loaded.count + 1
        _load_one(model, path, name, allow_pickle)
        loaded.files[key] = (stamp, name)
        loaded.layers = {part: _tuner_layers(model, (part,)) for part in _parts(model)}
    switch(model, ())


def _load_one(model: Model, path: Path, name: str, allow_pickle: bool) -> None:
    """One LoRA file into the model's networks, through the family's diffusers conversion (Model.load_lora)."""
    state = read_lora_file(path, allow_pickle)
    expected = sum(1 for key in state if _DOWN_KEY.search(key))
    report: list[str] = []
    with warnings.catch_warnings(), _loaders_quiet(report):
        warnings.simplefilter("ignore")  # peft: "Already found a peft_config attribute" (several LoRAs, on purpose)
        try:
            converted = model.load_lora(state, name)
            loaded = sum(name in getattr(layer, "lora_A", {}) for layer in _tuner_layers(model))
            hint = model.lora_mismatch(converted) if loaded < expected else None
            if hint:
                raise ValueError(hint)
            if expected == 0 or loaded < expected:
                raise ValueError(f"{expected - loaded} of its {expected} layers match no layer of this model"
                                 if expected else "no LoRA layers in it")
        except Exception as exc:
            _delete(model, name)
            raise LoraError(f"LoRA {path}: not a LoRA for this model ({model.model_id}, "
                            f"{model.shape_label}): {_reason(exc, name, report)}") from None
    for module in _modules(model):  # the new LoRA weights where their module is (an offloaded text encoder: the CPU)
        module.to(next(module.parameters()).device, model.dtype).requires_grad_(False)


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


def _parts(model: Model) -> tuple[str, ...]:
    """The parts a LoRA adapts: the denoiser and the text encoders."""
    return (model.denoiser_part, *model.text_parts)


def _modules(model: Model, parts: tuple[str, ...] | None = None) -> list[torch.nn.Module]:
    """The modules of `parts` the model has (SD has no second text encoder, the bench no first)."""
    networks = model.networks()
    return [networks[part] for part in (parts or _parts(model)) if part in networks]


def _tuner_layers(model: Model, parts: tuple[str, ...] | None = None) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for module in _modules(model, parts) for layer in module.modules()
            if isinstance(layer, BaseTunerLayer)]


def _delete(model: Model, name: str) -> None:
    """Remove adapter `name` wherever it was injected (a failed load leaves the model as it was)."""
    for layer in _tuner_layers(model):
        if name in getattr(layer, "lora_A", {}):
            layer.delete_adapter(name)
    for module in _modules(model):
        getattr(module, "peft_config", {}).pop(name, None)


def switch(model: Model, adapters: AdapterSet, parts: tuple[str, ...] | None = None) -> None:
    """Switch the LoRA layers of `parts` (default: the denoiser's and the text encoders') to `adapters`, each at its
    scale; () turns every LoRA off, which leaves exactly the bare model's computation.

    This runs a few times every step, so it sets peft's per-layer state directly (peft is pinned):
    `enable_adapters` and `set_adapter` also walk every LoRA weight's requires_grad, which made a
    switch cost about 3x as much on SD2's 128 attention projections. The LoRA weights are frozen once
    at loading, so there is nothing for those walks to do."""
    loaded = _loaded(model)
    names = [loaded.files[path][1] for path, _ in adapters]
    for layer in (layer for part in (parts or _parts(model)) for layer in loaded.layers.get(part, [])):
        layer._disable_adapters = not names  # what enable_adapters sets, less the requires_grad walk
        if names:
            layer._active_adapter = names  # what set_adapter sets, likewise
            for name, (_, scale) in zip(names, adapters):
                layer.set_scale(name, scale)  # scale * lora_alpha / r (rsLoRA: / sqrt(r)); absent: ignored


def encode_by_set(model: Model, texts: list[str], sets: list[AdapterSet],
                  encode: Callable[[list[str]], Conditioning]) -> Conditioning:
    """Each condition (texts[i] under sets[i]) encoded with its set's text-encoder LoRAs on, rows in
    condition order, each row carrying its set."""
    table = list(dict.fromkeys(sets))
    index = torch.tensor([table.index(s) for s in sets], dtype=torch.long)
    parts, order = [], []
    try:
        for k, adapters in enumerate(table):
            rows = [i for i in range(len(texts)) if index[i] == k]
            switch(model, adapters, model.text_parts)
            parts.append(encode([texts[i] for i in rows]))
            order += rows
    finally:
        switch(model, (), model.text_parts)
    back = torch.tensor(order).argsort()  # encoded row j holds condition order[j]
    return Conditioning.cat(parts)[back].with_adapters(index, table)


class AdapterRun:
    """Runs each adapter set's samples as one group (in the chunked run's calls) with that set switched on."""

    def __init__(self, run, model: Model):
        self.run, self.model = run, model
        self.switches, self.switch_seconds = 0, 0.0  # what switching sets cost (multidiff bench --loras)

    @property
    def samples_per_call(self) -> int:
        return self.run.samples_per_call

    def __call__(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        sets, index = conditioning.adapter_sets, conditioning.adapter_index
        if index is None:  # conditions of a scene without LoRAs: the model is bare between calls
            return self.run(inputs, t, conditioning)
        out, bare = None, False
        groups = sorted(torch.unique(index).tolist(), key=lambda k: not sets[k])  # the bare set last
        try:
            for k in groups:
                rows = (index == k).nonzero().flatten()
                self._switch(sets[k])
                bare = not sets[k]
                part = self.run(inputs[rows.to(inputs.device)], t, conditioning[rows])
                if out is None:
                    out = part.new_empty((inputs.shape[0], *part.shape[1:]))
                out[rows.to(out.device)] = part
        finally:
            if not bare:  # the denoiser is left bare after every call, as the rest of multidiff expects it
                self._switch(())
        return out

    def _switch(self, adapters: AdapterSet) -> None:
        started = time.perf_counter()
        switch(self.model, adapters, (self.model.denoiser_part,))
        self.switches += 1
        self.switch_seconds += time.perf_counter() - started
