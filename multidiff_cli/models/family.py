"""The one protocol every model family implements (`Model`), and its text conditioning (`Conditioning`).

A family is a subclass in models/<family>.py (SD: sd.py, SDXL: sdxl.py) and a row of facts in
catalog.py. An instance is that family's model, loaded and on its device. `run/` talks to this
protocol only: it never says a family's name, and a new family touches neither `run/` nor the
sampler (STYLE.md, *Families and noise schedules*). What a family provides:

- prompts: `encode_prompts` into a `Conditioning`, `truncation_warnings`, `zeroed_rows`;
- the denoiser: `forward` (one network call over a batch of samples; the sampler's samples are
  guided, chunked and grouped by LoRA set above it);
- latent geometry: `latent_channels`, `native_cells` (its window), `facts.cell_px` and `facts.align_px`;
- schedules: `make_schedule` (its scheduler names and defaults are in its facts);
- the codec: `codec` (a VAECodec, or the family's own);
- LoRAs: `load_lora` and the parts they adapt (`denoiser_part`, `text_parts`);
- ControlNets and IP-Adapters, where its facts say `controlnets`: `forward(..., controls=, references=)`
  adds their residuals and runs their rows with the IP attention on (models/control.py, reference.py);
- memory: `bytes_per_sample` (activations of one sample over a view).
"""
from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..catalog import Family
from .conditioning import AdapterSet, Conditioning

if TYPE_CHECKING:
    from ..method.schedule import NoiseSchedule
    from .codec import VAECodec

@dataclass
class LoadedState:
    """What a model carries besides its networks: where it came from and how it runs."""

    model_id: str
    scheduler_config: dict[str, Any]
    revision: str | None = None
    few_step_model: bool = False  # distilled to sample in a few steps (SD-Turbo, LCM, ...): loading.is_few_step_model
    vae_id: str | None = None  # the scene's `vae:`, where it replaced the model's own VAE
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    lora_state: Any = None  # the LoRAs loaded into its networks (models/adapters.py)
    offload: bool = False  # the text encoders wait on the CPU between renders (Model.to)
    controlnets: dict[str, Any] = field(default_factory=dict)  # ControlNets loaded for renders (models/control.py)
    ip_state: Any = None  # the IP-Adapters loaded into its UNet (models/reference.py)


class Model(ABC):
    """A model of one family, loaded: its networks, its conditioning, its codec and schedules."""

    facts: ClassVar[Family]
    denoiser_part: ClassVar[str]  # the network the sampler's samples run through ("unet", "transformer")
    text_parts: ClassVar[tuple[str, ...]]  # the text encoders, in order (LoRAs adapt them too)
    network_label: ClassVar[str] = "UNet"  # what messages call the denoiser
    single_file_pipeline: ClassVar[str]  # the diffusers pipeline class whose from_single_file reads its checkpoints
    single_file_kwargs: ClassVar[dict] = {}  # what that call takes besides the file and configs

    def __init__(self, state: LoadedState):
        self.state = state

    # --- where it came from and where it runs ---------------------------------------------------

    @property
    def family(self) -> str:
        return self.facts.name

    @property
    def model_id(self) -> str:
        return self.state.model_id

    @property
    def revision(self) -> str | None:
        return self.state.revision

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def dtype(self) -> torch.dtype:
        return self.state.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def few_step_model(self) -> bool:
        return self.state.few_step_model

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.state.scheduler_config

    @abstractmethod
    def networks(self) -> dict[str, torch.nn.Module]:
        """Every network by part name ("unet", "vae", "text_encoder", ...); absent parts left out."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.networks()[self.denoiser_part]

    def to(self, device: torch.device, dtype: torch.dtype, offload: bool = False) -> Model:
        """Move to `device`: every network in `dtype` but the VAE, which stays float32 (fp16 decodes
        overflow), except a VAE the scene's `vae:` names whose config says `force_upcast: false`
        (diffusers' mark of a VAE safe in float16, such as madebyollin/sdxl-vae-fp16-fix).

        offload: the text encoders wait on the CPU and visit `device` only while they encode a render's
        prompts (`encoding`): the device then holds the denoiser and the VAE, and the text encoders
        only at the start of each render."""
        for name, module in self.networks().items():
            module_dtype = dtype
            if name == "vae" and not (self.state.vae_id is not None and getattr(module.config, "force_upcast", True) is False):
                module_dtype = torch.float32
            home = torch.device("cpu") if offload and name in self.text_parts else device
            module.to(device=home, dtype=module_dtype).eval().requires_grad_(False)
        self.state.device, self.state.dtype, self.state.offload = device, dtype, offload and device.type != "cpu"
        return self

    @contextlib.contextmanager
    def encoding(self):
        """The text encoders on the device for the prompts of a render, and back on the CPU after, when
        they are offloaded (`to(offload=True)`)."""
        if not self.state.offload:
            yield
            return
        parts = [module for name, module in self.networks().items() if name in self.text_parts]
        for module in parts:
            module.to(self.device)
        try:
            yield
        finally:
            for module in parts:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def speed_up(self, compile: bool = False) -> Model:
        """What measured faster for this family (none by default); `compile`: torch.compile the denoiser."""
        if compile:
            self.compile_denoiser()
        return self

    def compile_denoiser(self) -> None:
        """Replace the denoiser (the attribute `denoiser_part` names) with its torch.compile'd self."""
        compiled = torch.compile(self.denoiser, mode="max-autotune-no-cudagraphs", fullgraph=False)
        setattr(self, self.denoiser_part, compiled)

    # --- prompts --------------------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, texts: list[str], view_px: tuple[int, int]) -> Conditioning:
        """Every text's conditioning, as the family's diffusers pipeline encodes it; view_px: the
        (height, width) of the pictures the denoiser makes (a view's)."""

    def zeroed_rows(self, texts: list[str], cond: list[int], negative: list[int]) -> frozenset[int]:
        """The texts whose conditioning the family sets to zeros (SDXL: an empty negative prompt)."""
        return frozenset()

    zeroed_tensors: ClassVar[tuple[str, ...]] = ()  # which tensors of those rows

    @abstractmethod
    def random_conditioning(self, count: int, view_px: tuple[int, int], generator: torch.Generator) -> Conditioning:
        """`count` rows of conditioning of the denoiser's shapes with random values, for views of
        view_px (the bench's full-size models carry no text encoders)."""

    @abstractmethod
    def truncation_warnings(self, labelled_texts: list[tuple[str, str]]) -> list[str]:
        """Name every (label, text) longer than the text encoder's window, and where it is cut."""

    def encode_conditions(self, texts: list[str], adapter_sets: list[AdapterSet], cond: list[int],
                          negative: list[int], view_px: tuple[int, int],
                          guidance: list[float | None] | None = None) -> Conditioning:
        """The conditioning of every condition (texts[i] under adapter_sets[i]): encoded with its set's
        text-encoder LoRAs on where it has one, then the family's zeroed rows (`zeroed_rows` of the
        texts used as `cond` and `negative`) zeroed; where the model embeds guidance, each row's value
        (guidance[i]) with it."""
        from .adapters import encode_by_set

        def encode(group: list[str]) -> Conditioning:
            return self.encode_prompts(group, view_px)

        with self.encoding():
            conditioning = encode_by_set(self, texts, adapter_sets, encode) if any(adapter_sets) else encode(texts)
        conditioning = conditioning.zeroed(self.zeroed_rows(texts, cond, negative), self.zeroed_tensors)
        return self.with_guidance(conditioning, guidance) if self.embedded_guidance and guidance else conditioning

    @property
    def embedded_guidance(self) -> bool:
        """Whether guidance_scale is an input of the network (one value per sample), not classifier-free
        guidance over an unconditional pass (FLUX.1-dev)."""
        return False

    def with_guidance(self, conditioning: Conditioning, guidance: list[float]) -> Conditioning:
        """The conditioning with each row's embedded guidance value (families that embed guidance)."""
        raise NotImplementedError(f"{self.facts.label} models embed no guidance")

    # --- the denoiser ----------------------------------------------------------------------------

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latent canvas the sampler fuses on."""

    @property
    @abstractmethod
    def native_cells(self) -> int:
        """The side of the network's native window, in latent cells (views are this size)."""

    @abstractmethod
    def forward(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """One network call: the float model outputs (B, C, h, w) of B samples, in the schedule's
        parametrisation (ε or v for SD, the velocity for flow matching)."""

    @abstractmethod
    def bytes_per_sample(self, view_cells: int) -> int:
        """Activation memory of one sample over `view_cells` latent cells (an estimate)."""

    def free_bytes(self) -> int | None:
        """Free memory where the render's tensors live (None where it cannot be told)."""
        from .device import available_bytes

        return available_bytes(self.device)

    def auto_samples_per_call(self, view_cells: int) -> int:
        """`max_batch: auto` for views of `view_cells`: what this device runs fastest, in its free memory."""
        from .batching import auto_samples_per_call

        return auto_samples_per_call(self.device.type, self.bytes_per_sample(view_cells), self.free_bytes())

    def sample_run(self, samples_per_call: int, warn: Callable[[str], None] | None = None, **extras):
        """The network over a step's samples (method.guidance.ModelRun): in calls of at most
        `samples_per_call`, each LoRA set's rows with that set switched on when LoRAs are loaded; `extras`
        go to every `forward` call (families whose facts say `controlnets`: `controls=`, `references=`,
        models/control.py and models/reference.py)."""
        import functools

        from .adapters import AdapterRun
        from .batching import ChunkedRun

        extras = {name: value for name, value in extras.items() if value}
        forward = functools.partial(self.forward, **extras) if extras else self.forward
        run = ChunkedRun(forward, samples_per_call, warn, self.network_label)
        if extras:  # each control and reference set's rows together in the calls
            from .control import GroupedRun

            run = GroupedRun(run)
        return AdapterRun(run, self) if self.state.lora_state is not None else run

    # --- ControlNets (families whose facts say `controlnets`) -------------------------------------

    controlnet_class: ClassVar[str | None] = None  # the diffusers class of its ControlNets

    def random_controlnet(self, seed: int = 0):
        """A ControlNet shaped for this model's denoiser, with random weights (`model: random-controlnet`)."""
        raise NotImplementedError(f"{self.facts.label} models take no ControlNet")

    def control_mismatch(self, net) -> str | None:
        """Why a loaded ControlNet cannot drive this model (another family, width or shape), or None."""
        return None

    def control_guide(self, net, pixels: torch.Tensor) -> torch.Tensor:
        """A canvas-sized control picture (1, 3, H, W) in [0, 1] as `net` reads it, on the latent grid: (1, c, h, w)
        channels per cell, which the sampler crops with every input."""
        raise NotImplementedError(f"{self.facts.label} models take no ControlNet")

    # --- schedules and the codec ------------------------------------------------------------------

    def first_step(self, steps: int, strength: float) -> int:
        """The step an img2img render starts at, as the family's diffusers img2img pipeline counts
        (SD's: it runs the last int(steps * strength)); at least one step runs."""
        from ..method.sampler import first_step

        return first_step(steps, strength)

    @abstractmethod
    def make_schedule(self, name: str, steps: int, view_hw: tuple[int, int]) -> NoiseSchedule:
        """Scheduler `name` (one of facts.schedulers) over `steps` steps, for views of view_hw cells
        (FLUX's dynamic shift reads the view's size), its timesteps set on this model's device."""

    @property
    @abstractmethod
    def codec(self) -> VAECodec:
        """Pixels <-> latents."""

    # --- LoRAs -----------------------------------------------------------------------------------

    def load_loras(self, paths: list[Path], allow_pickle: bool = False) -> None:
        """Load these LoRA files (those not loaded yet) as adapters, all switched off; LoraError for a
        file that is no LoRA of this model."""
        from .adapters import load_loras

        load_loras(self, paths, allow_pickle)

    @abstractmethod
    def load_lora(self, state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        """Inject a LoRA file's tensors into the denoiser and the text encoders as peft adapter
        `adapter_name`, through the family's diffusers conversion; returns the converted state. Raises
        ValueError (or diffusers' errors) for a file of another shape."""

    def lora_mismatch(self, converted: dict[str, torch.Tensor]) -> str | None:
        """Why a LoRA whose layers do not all fit is probably another family's, or None."""
        return None

    @property
    def shape_label(self) -> str:
        """What the model is, for a LoRA's error message ("SD 2.x-shaped")."""
        return f"{self.facts.label}-shaped"


def family_class(family: Family) -> type[Model]:
    """The class of a family's models (models/<family.module>.py)."""
    return getattr(importlib.import_module(f"{__package__}.{family.module}"), family.class_name)
