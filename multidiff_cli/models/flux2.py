"""The FLUX.2 klein family (4B and 9B, distilled and base): Qwen3's hidden states of three layers side by side,
a flow-matching transformer over tokens of 2x2 patches, and a 32-channel VAE whose latents are patchified and
normalised per patch channel by the VAE's batch-norm statistics.

**The canvas is kept in patchified form.** klein's latent space is the patchified one: 128 channels (32 x 2 x 2)
on 16 px cells, each channel normalised by its own running mean and variance. The pipeline draws its noise
there, the transformer reads one token per cell, and the normalisation is per patch position: a view or a mask
that cut a patch in two would mix statistics. So this family's cell is a whole patch (facts.cell_px = 16): views,
masks and weights are on 16 px cells, every view starts on a whole patch by construction, and the sampler's
noise is the pipeline's own randn((1, 128, H/16, W/16)). Only the codec sees the 32-channel 8 px grid.

Guidance: the distilled models (`FLUX.2-klein-4B`, `-9B`; `is_distilled` in model_index.json) run one sample per
prompt (a few-step model: guidance 1 by default, no unconditional pass); the base models, ordinary CFG over the
negative prompt ("" by default, as Flux2KleinPipeline's). The schedule's shift is the pipeline's empirical `mu`,
from the view's token count and the steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..catalog import FLUX2 as FLUX2_FACTS
from ..method.schedule import FlowSchedule
from .codec import VAECodec
from .conditioning import Conditioning
from .family import LoadedState, Model
from .flux import flow_first_step, pipeline_flow_schedule
from .zimage import chat_prompts

MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's: every prompt padded to it (pad tokens are attended)
TEXT_LAYERS = (9, 18, 27)  # the Qwen3 hidden states klein reads, side by side (the pipeline's default)
TRANSFORMER_MULTIPLICITY = 24  # live tensors per token and width, per sample (an estimate, unmeasured)


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's dynamic shift for a picture of `image_seq_len` tokens sampled in `steps` steps (the pipeline's
    fit: linear in the tokens, interpolated in the steps between 10 and 200, the 200-step line past 4300 tokens)."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    intercept = m_200 - 200.0 * slope
    return float(slope * steps + intercept)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, 4C, H/2, W/2): each 2x2 patch's four cells as channels (c, dy, dx)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def positions(h: int, w: int, device) -> torch.Tensor:
    """(h * w, 4) position ids (t, row, column, l) of a picture of h x w patches, as Flux2KleinPipeline builds them."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


class PatchCodec(VAECodec):
    """AutoencoderKLFlux2 with klein's latent space: the VAE's 32-channel mean patchified 2x2, then each of the
    128 channels normalised by the VAE's batch-norm running statistics (and back, to decode)."""

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, torch.float32)
        return mean, std

    def to_latents(self, mean: torch.Tensor) -> torch.Tensor:
        patches = patchify(mean.float())
        bn_mean, bn_std = self._statistics(patches)
        return (patches - bn_mean) / bn_std

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        bn_mean, bn_std = self._statistics(latents)
        return unpatchify(latents.float() * bn_std + bn_mean).to(latents.dtype)


class Flux2Klein(Model):
    """FLUX.2 klein: Qwen3 (hidden states of layers 9, 18 and 27), Flux2Transformer2DModel, AutoencoderKLFlux2."""

    facts: ClassVar = FLUX2_FACTS
    denoiser_part: ClassVar[str] = "transformer"
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder",)
    network_label: ClassVar[str] = "transformer"
    single_file_pipeline: ClassVar[str] = "Flux2KleinPipeline"
    single_file_kwargs: ClassVar[dict] = {}

    def __init__(self, tokenizer, text_encoder, transformer, vae, state: LoadedState):
        super().__init__(state)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.transformer, self.vae = transformer, vae

    @classmethod
    def from_folder(cls, folder: Path, state: LoadedState, safetensors: Callable[[str], bool]) -> Flux2Klein:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        return cls(
            tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=Qwen3ForCausalLM.from_pretrained(folder, subfolder="text_encoder",
                                                          use_safetensors=safetensors("text_encoder")),
            transformer=Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                                use_safetensors=safetensors("transformer")),
            vae=AutoencoderKLFlux2.from_pretrained(folder, subfolder="vae", use_safetensors=safetensors("vae")),
            state=state,
        )

    @classmethod
    def from_pipeline(cls, pipe, state: LoadedState) -> Flux2Klein:
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.transformer, pipe.vae, state)

    def networks(self) -> dict[str, torch.nn.Module]:
        parts = {"text_encoder": self.text_encoder, "transformer": self.transformer, "vae": self.vae}
        return {name: module for name, module in parts.items() if module is not None}

    # --- prompts

    def encode_prompts(self, texts: list[str], view_px: tuple[int, int]) -> Conditioning:
        """As Flux2KleinPipeline._get_qwen3_prompt_embeds: each text as one user turn of the chat template
        (thinking off), padded to MAX_SEQUENCE_LENGTH, and the hidden states of TEXT_LAYERS side by side."""
        formatted = chat_prompts(self.tokenizer, texts, thinking=False)
        tokens = self.tokenizer(formatted, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                return_tensors="pt")
        with torch.inference_mode():
            out = self.text_encoder(input_ids=tokens.input_ids.to(self.device),
                                    attention_mask=tokens.attention_mask.to(self.device), output_hidden_states=True,
                                    use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=1)  # (B, layers, L, D)
        b, layers, length, width = stacked.shape
        hidden = stacked.permute(0, 2, 1, 3).reshape(b, length, layers * width)
        return Conditioning({"hidden_states": hidden.to(self.text_encoder.dtype)})

    def truncation_warnings(self, labelled_texts: list[tuple[str, str]]) -> list[str]:
        notes = []
        for label, text in labelled_texts:
            ids = self.tokenizer(chat_prompts(self.tokenizer, [text], thinking=False)[0], truncation=False,
                                 verbose=False).input_ids
            if len(ids) > MAX_SEQUENCE_LENGTH:
                notes.append(f"{label} is {len(ids)} tokens with the chat template, over the {MAX_SEQUENCE_LENGTH} "
                             f"klein reads: cut there")
        return notes

    def random_conditioning(self, count: int, view_px: tuple[int, int], generator: torch.Generator) -> Conditioning:
        width = self.transformer.config.joint_attention_dim
        return Conditioning({"hidden_states": torch.randn((count, MAX_SEQUENCE_LENGTH, width), generator=generator)})

    # --- the denoiser

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)  # 128: the patchified, normalised canvas

    @property
    def native_cells(self) -> int:
        """1024 px for klein (its VAE's sample_size), in 16 px cells."""
        return int(self.vae.config.sample_size) // self.facts.cell_px

    def forward(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer as Flux2KleinPipeline calls it: one token per cell, the view's own position ids,
        timestep t/1000, no guidance input; the velocity back on the cells."""
        b, c, h, w = inputs.shape
        dtype = self.transformer.dtype
        tokens = inputs.to(dtype).reshape(b, c, h * w).permute(0, 2, 1)
        hidden = conditioning.get("hidden_states")
        text_ids = positions(1, 1, inputs.device).repeat(hidden.shape[1], 1)
        text_ids[:, 3] = torch.arange(hidden.shape[1], device=inputs.device)
        out = self.transformer(
            hidden_states=tokens, timestep=t.expand(b).to(dtype) / 1000, guidance=None, encoder_hidden_states=hidden,
            txt_ids=text_ids.expand(b, -1, -1), img_ids=positions(h, w, inputs.device).expand(b, -1, -1),
            return_dict=False,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w).float()

    def bytes_per_sample(self, view_cells: int) -> int:
        config = self.transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        tokens = view_cells + MAX_SEQUENCE_LENGTH
        return tokens * width * (torch.finfo(self.dtype).bits // 8) * TRANSFORMER_MULTIPLICITY

    # --- schedules and the codec

    def make_schedule(self, name: str, steps: int, view_hw: tuple[int, int]) -> FlowSchedule:
        """As Flux2KleinPipeline: sigmas 1 .. 1/steps, shifted by the empirical `mu` of the view's token count
        (one token per cell) and the steps."""
        return pipeline_flow_schedule(self, name, steps, lambda config: empirical_mu(view_hw[0] * view_hw[1], steps))

    def first_step(self, steps: int, strength: float) -> int:
        return flow_first_step(steps, strength)

    @property
    def codec(self) -> VAECodec:
        return PatchCodec(self.vae, self.facts.cell_px)

    # --- LoRAs

    def load_lora(self, state, adapter_name):
        import diffusers

        pipeline = diffusers.Flux2KleinPipeline  # its conversion reads diffusers/peft and kohya FLUX.2 files
        converted = pipeline.lora_state_dict(state)
        if not converted or not all("lora" in key for key in converted):
            raise ValueError("no LoRA layers in it")
        pipeline.load_lora_into_transformer(converted, self.transformer, adapter_name=adapter_name)
        return converted

    def lora_mismatch(self, converted):
        if any(key.startswith("unet.") for key in converted):
            return "it names a UNet (unet. layers): a LoRA of an SD or SDXL model"
        return None

    @property
    def shape_label(self) -> str:
        config = self.transformer.config
        return f"FLUX.2-klein-shaped, {config.num_attention_heads * config.attention_head_dim} wide"
