"""The Stable Diffusion 1.x/2.x family: CLIP text encoding, the UNet (ε or v prediction), an 8x VAE,
diffusers' DDPM-family schedulers."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..catalog import SD as SD_FACTS
from ..method.schedule import DiffusionSchedule
from .codec import VAECodec
from .control import Control, build_random_controlnet, control_mismatch, control_residuals
from .reference import References, by_reference_set
from .family import Conditioning, LoadedState, Model
from .schedulers import make_scheduler

# Live activation tensors per element of the UNet's first level, per sample (measured on the CPU:
# SD2-base at 512x512 in float32 holds about 0.2 GiB per sample; attention runs through SDPA,
# which keeps no quadratic matrix). It bounds SDXL's too: measured the same way (peak RSS of one
# call of 1, 2 and 4 samples of 64x64 latents, bfloat16, README *SDXL*), SDXL base's UNet held
# 45-75 MiB per extra sample where SD2's held 93-105: its first level has no attention, and its
# transformer blocks work on 4x and 16x fewer cells.
UNET_MULTIPLICITY = 40


def unet_bytes_per_sample(unet_config, view_cells: int, dtype: torch.dtype) -> int:
    """Activation memory of one UNet sample over `view_cells` latent cells: UNET_MULTIPLICITY live
    tensors of the first level's width per cell (an estimate)."""
    element = torch.finfo(dtype).bits // 8
    return view_cells * unet_config.block_out_channels[0] * element * UNET_MULTIPLICITY


def encode_clip(tokenizer, encoder, texts: list[str], device: torch.device, **kwargs):
    """CLIP text-encoder outputs of `texts`, padded to the tokenizer's window, as diffusers' SD pipelines
    tokenize them (an attention mask only where the encoder's config asks for one)."""
    tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    with torch.inference_mode():
        return encoder(tokens.input_ids.to(device), attention_mask=mask, **kwargs)


def clip_truncation_warnings(tokenizer, labelled_texts: list[tuple[str, str]]) -> list[str]:
    """Name every (label, text) longer than a CLIP tokenizer's window, and where it is cut."""
    limit, notes = tokenizer.model_max_length, []  # 77 for CLIP: 75 prompt tokens between the start and end tokens
    for label, text in labelled_texts:
        ids = tokenizer(text, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            kept = tokenizer.decode(ids[1 : limit - 1])
            notes.append(f"{label} is {len(ids) - 2} tokens, over the text encoder's {limit - 2} ({limit} with the "
                         f"start and end tokens): cut after '...{kept[-40:]}'")
    return notes


class SD(Model):
    """SD 1.x/2.x (and SD-Turbo): one CLIP text encoder's last hidden states condition the UNet."""

    facts: ClassVar = SD_FACTS
    denoiser_part: ClassVar[str] = "unet"
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __init__(self, tokenizer, text_encoder, unet, vae, state: LoadedState):
        super().__init__(state)
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae

    @classmethod
    def from_folder(cls, folder: Path, state: LoadedState, safetensors: Callable[[str], bool]) -> SD:
        """A diffusers folder's parts (safetensors weights where `safetensors(part)`, no remote code)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                       use_safetensors=safetensors("text_encoder")),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=safetensors("unet")),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=safetensors("vae")),
            state=state,
        )

    single_file_pipeline: ClassVar[str] = "StableDiffusionPipeline"  # diffusers' class that reads its checkpoints
    single_file_kwargs: ClassVar[dict] = {"safety_checker": None, "feature_extractor": None,
                                          "requires_safety_checker": False}

    @classmethod
    def from_pipeline(cls, pipe, state: LoadedState) -> SD:
        """The parts of a diffusers pipeline (a single file read through `from_single_file`)."""
        return cls(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae, state=state)

    def networks(self) -> dict[str, torch.nn.Module]:
        parts = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
        return {name: module for name, module in parts.items() if module is not None}  # the bench has no text encoder

    def speed_up(self, compile: bool = False) -> SD:
        """Channels-last convolutions where they measured faster; optionally torch.compile the UNet.

        - the UNet on CUDA (tensor cores); on the CPU it gained nothing (7.04 against 7.19 s a call of
          2 samples of 64x64 latents, SD2, 2 cores, and slower under load);
        - the VAE on the CPU: oneDNN runs its full-resolution convolutions faster channels-last (a
          1024x512 decode: 14.9 s against 18.4 s, SD2's VAE, float32, 2 cores). Its results differ from
          the default layout's by float rounding: decoded pixels by 2e-4 of the [-1, 1] range (under one
          8-bit level), and what it encodes (bootstrap backgrounds, init images) likewise, so a CPU
          render's latents differ from those of a model set up without it by rounding too.

        Attention already runs through PyTorch's scaled-dot-product attention (diffusers' default
        processor on torch 2). Compilation costs a minute or so on the first call and pays off over
        long batches."""
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
        if self.device.type == "cpu":
            self.vae.to(memory_format=torch.channels_last)
        return super().speed_up(compile)

    # --- prompts

    def encode_prompts(self, texts: list[str], view_px: tuple[int, int]) -> Conditioning:
        """(E, 77, D) text-encoder hidden states, as diffusers' SD pipelines compute them."""
        hidden = encode_clip(self.tokenizer, self.text_encoder, texts, self.device)[0]
        return Conditioning({"hidden_states": hidden})

    def truncation_warnings(self, labelled_texts: list[tuple[str, str]]) -> list[str]:
        return clip_truncation_warnings(self.tokenizer, labelled_texts)

    def random_conditioning(self, count: int, view_px: tuple[int, int], generator: torch.Generator) -> Conditioning:
        """Conditioning of the UNet's shapes with random values (the bench builds no text encoder)."""
        return Conditioning({"hidden_states": torch.randn((count, 77, self.unet.config.cross_attention_dim),
                                                          generator=generator)})

    # --- the denoiser

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def native_cells(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else min(size)

    def unet_kwargs(self, conditioning: Conditioning) -> dict[str, Any]:
        """What diffusers' pipeline passes its UNet besides the latents and the timestep."""
        return {"encoder_hidden_states": conditioning.get("hidden_states")}

    def forward(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                controls: tuple[Control, ...] = (), references: References | None = None) -> torch.Tensor:
        """The UNet over a batch; with controls, each one's ControlNet residuals added to the rows that use it;
        with references, each group of rows with one set of them run with the IP attention on at their scales,
        the rows without one on the bare UNet."""
        inputs = inputs.to(self.unet.dtype)
        everything = len(conditioning)

        def call(rows: torch.Tensor, image: dict[str, Any]) -> torch.Tensor:
            part = conditioning if rows.numel() == everything else conditioning[rows]
            x = inputs if rows.numel() == everything else inputs[rows]
            kwargs = self.unet_kwargs(part)
            residuals = control_residuals(controls, x, t, part, kwargs, self.facts.cell_px)
            if image:  # diffusers' pipelines give the ControlNet no image embeddings, the UNet its IP ones
                kwargs["added_cond_kwargs"] = {**kwargs.get("added_cond_kwargs", {}), **image}
            return self.unet(x, t, **kwargs, **residuals).sample.float()

        return by_reference_set(self.unet, references, conditioning, inputs, call)

    def bytes_per_sample(self, view_cells: int) -> int:
        return unet_bytes_per_sample(self.unet.config, view_cells, self.dtype)

    # --- ControlNets

    controlnet_class: ClassVar[str] = "ControlNetModel"

    def random_controlnet(self, seed: int = 0):
        return build_random_controlnet(self.unet, seed)

    def control_mismatch(self, net) -> str | None:
        return control_mismatch(net, self.unet)

    def control_guide(self, net, pixels: torch.Tensor) -> torch.Tensor:
        """The picture itself, as diffusers' control_image_processor makes it ([0, 1]), pixel-unshuffled so each
        latent cell holds its 8x8 pixels."""
        return torch.nn.functional.pixel_unshuffle(pixels, self.facts.cell_px)

    # --- schedules and the codec

    def make_schedule(self, name: str, steps: int, view_hw: tuple[int, int]) -> DiffusionSchedule:
        schedule = DiffusionSchedule(make_scheduler(name, self.scheduler_config, self.facts.schedulers))
        schedule.set_timesteps(steps, device=self.device)
        return schedule

    @property
    def codec(self) -> VAECodec:
        return VAECodec(self.vae, self.facts.cell_px)

    # --- LoRAs

    lora_pipeline: ClassVar[str] = "StableDiffusionPipeline"

    def lora_state_dict(self, state: dict[str, torch.Tensor]):
        import diffusers

        return getattr(diffusers, self.lora_pipeline).lora_state_dict(state)

    def load_lora(self, state, adapter_name):
        import diffusers

        pipeline = getattr(diffusers, self.lora_pipeline)
        converted, alphas = self.lora_state_dict(state)
        if not converted or not all("lora" in key for key in converted):
            raise ValueError("no LoRA layers in it")
        pipeline.load_lora_into_unet(converted, alphas, self.unet, adapter_name=adapter_name)
        for part in self.text_parts:
            encoder = getattr(self, part)
            if encoder is not None:  # the bench runs without one
                pipeline.load_lora_into_text_encoder(converted, alphas, encoder, prefix=part, adapter_name=adapter_name)
        return converted

    def lora_mismatch(self, converted):
        if any(key.startswith("transformer.") or "double_blocks" in key or "single_transformer_blocks" in key
               for key in converted):
            return "it names a transformer's blocks (double_blocks, single_transformer_blocks): a FLUX LoRA?"
        if any(key.startswith("text_encoder_2.") for key in converted):
            return ("it has layers for a second text encoder (text_encoder_2), which SDXL models have and this one "
                    "does not: an SDXL LoRA?")
        return None

    @property
    def shape_label(self) -> str:
        width = self.unet.config.cross_attention_dim
        return {768: "SD 1.x-shaped", 1024: "SD 2.x-shaped"}.get(width, f"{width}-wide cross attention")
