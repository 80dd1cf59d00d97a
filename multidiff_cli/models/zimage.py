"""The Z-Image family (Turbo and base): Qwen3's hidden states, a single-stream transformer over 2x2 patches
that takes one tensor per sample, a 16-channel VAE with a shift factor (FLUX.1's).

Three quirks of ZImagePipeline, kept here and nowhere else:
- each prompt's hidden states are trimmed to its true length (no pad tokens). The Conditioning holds them
  padded to MAX_SEQUENCE_LENGTH with each row's length beside them, and `forward` trims every sample's
  again: the samples of a step are batched (the transformer pads them to one length inside, with an
  attention mask), never grouped by length;
- the transformer reads the inverted timestep (1000 - t) / 1000 and its output is the negated velocity;
- its guidance is pos + g * (pos - neg): the scene's guidance_scale is the pipeline's g (0 is none, as
  Z-Image-Turbo is run), which the sampler's neg + s * (pos - neg) reads as s = g + 1 (catalog: cfg_offset).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..catalog import ZIMAGE as ZIMAGE_FACTS
from ..method.schedule import FlowSchedule
from .codec import VAECodec
from .conditioning import Conditioning
from .family import LoadedState, Model
from .flux import calculate_shift, flow_first_step, pipeline_flow_schedule

MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default: the chat-formatted prompt is cut there
TRANSFORMER_MULTIPLICITY = 24  # live tensors per token and width, per sample (an estimate, unmeasured)


def chat_prompts(tokenizer, texts: list[str], thinking: bool = True) -> list[str]:
    """Each text as ZImagePipeline hands it to Qwen3: one user turn of the tokenizer's chat template, the
    assistant's turn opened (thinking enabled, so no empty think block; FLUX.2 klein turns it off)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=thinking) for text in texts]


class ZImage(Model):
    """Z-Image: Qwen3 (its second-to-last hidden states), ZImageTransformer2DModel, AutoencoderKL (16 channels)."""

    facts: ClassVar = ZIMAGE_FACTS
    denoiser_part: ClassVar[str] = "transformer"
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder",)
    network_label: ClassVar[str] = "transformer"
    single_file_pipeline: ClassVar[str] = "ZImagePipeline"
    single_file_kwargs: ClassVar[dict] = {}

    def __init__(self, tokenizer, text_encoder, transformer, vae, state: LoadedState):
        super().__init__(state)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.transformer, self.vae = transformer, vae

    @classmethod
    def from_folder(cls, folder: Path, state: LoadedState, safetensors: Callable[[str], bool]) -> ZImage:
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        return cls(
            tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=Qwen3Model.from_pretrained(folder, subfolder="text_encoder",
                                                    use_safetensors=safetensors("text_encoder")),
            transformer=ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                                 use_safetensors=safetensors("transformer")),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=safetensors("vae")),
            state=state,
        )

    @classmethod
    def from_pipeline(cls, pipe, state: LoadedState) -> ZImage:
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.transformer, pipe.vae, state)

    def networks(self) -> dict[str, torch.nn.Module]:
        parts = {"text_encoder": self.text_encoder, "transformer": self.transformer, "vae": self.vae}
        return {name: module for name, module in parts.items() if module is not None}

    # --- prompts

    def encode_prompts(self, texts: list[str], view_px: tuple[int, int]) -> Conditioning:
        """As ZImagePipeline._encode_prompt: the chat-formatted texts through Qwen3 with their attention mask,
        the second-to-last hidden states; each row's true length kept beside them (`forward` trims to it)."""
        tokens = self.tokenizer(chat_prompts(self.tokenizer, texts), padding="max_length",
                                max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device).bool()
        with torch.inference_mode():
            hidden = self.text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                                       output_hidden_states=True).hidden_states[-2]
        hidden = hidden * mask[..., None].to(hidden.dtype)  # what lies past a row's length is never read
        return Conditioning({"hidden_states": hidden, "length": mask.sum(dim=1)})

    def truncation_warnings(self, labelled_texts: list[tuple[str, str]]) -> list[str]:
        notes = []
        for label, text in labelled_texts:
            ids = self.tokenizer(chat_prompts(self.tokenizer, [text])[0], truncation=False, verbose=False).input_ids
            if len(ids) > MAX_SEQUENCE_LENGTH:
                notes.append(f"{label} is {len(ids)} tokens with the chat template, over Qwen3's "
                             f"{MAX_SEQUENCE_LENGTH} here: cut there")
        return notes

    def random_conditioning(self, count: int, view_px: tuple[int, int], generator: torch.Generator) -> Conditioning:
        width = self.transformer.config.cap_feat_dim
        length = 64  # a prompt of some 40 words with the chat template's tokens
        hidden = torch.zeros((count, MAX_SEQUENCE_LENGTH, width))
        hidden[:, :length] = torch.randn((count, length, width), generator=generator)
        return Conditioning({"hidden_states": hidden, "length": torch.full((count,), length)})

    # --- the denoiser

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def native_cells(self) -> int:
        """1024 px for Z-Image (its VAE's sample_size), in cells."""
        return int(self.vae.config.sample_size) // self.facts.cell_px

    def forward(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer as ZImagePipeline calls it: a list of (C, 1, h, w) latents and one list of each
        sample's trimmed hidden states, the timestep inverted, the output negated into the velocity."""
        dtype = self.transformer.dtype
        hidden, lengths = conditioning.get("hidden_states"), conditioning.get("length").long().tolist()
        captions = [row[:length].to(dtype) for row, length in zip(hidden, lengths)]
        latents = list(inputs.to(dtype).unsqueeze(2).unbind(dim=0))
        timestep = (1000 - t.expand(inputs.shape[0]).to(torch.float32)) / 1000
        out = self.transformer(latents, timestep.to(dtype), captions, return_dict=False)[0]
        return -torch.stack([sample.float() for sample in out]).squeeze(2)

    def bytes_per_sample(self, view_cells: int) -> int:
        config = self.transformer.config
        tokens = view_cells // 4 + MAX_SEQUENCE_LENGTH
        return tokens * config.dim * (torch.finfo(self.dtype).bits // 8) * TRANSFORMER_MULTIPLICITY

    # --- schedules and the codec

    def make_schedule(self, name: str, steps: int, view_hw: tuple[int, int]) -> FlowSchedule:
        """As ZImagePipeline: sigmas 1 .. 1/steps, the scheduler's shift (static in Z-Image's configs; `mu`
        from the view's token count where a config shifts dynamically)."""
        return pipeline_flow_schedule(self, name, steps, lambda config: calculate_shift(
            (view_hw[0] // 2) * (view_hw[1] // 2), config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.15)))

    def first_step(self, steps: int, strength: float) -> int:
        return flow_first_step(steps, strength)

    @property
    def codec(self) -> VAECodec:
        return VAECodec(self.vae, self.facts.cell_px)

    # --- LoRAs

    def load_lora(self, state, adapter_name):
        import diffusers

        pipeline = diffusers.ZImagePipeline  # its conversion reads diffusers/peft, kohya and ai-toolkit files
        converted = pipeline.lora_state_dict(state)
        if not converted or not all("lora" in key for key in converted):
            raise ValueError("no LoRA layers in it")
        pipeline.load_lora_into_transformer(converted, self.transformer, adapter_name=adapter_name)
        return converted

    def lora_mismatch(self, converted):
        if any(key.startswith(("unet.", "lora_unet_down", "lora_unet_up", "lora_unet_mid")) for key in converted):
            return "it names a UNet (unet. layers): a LoRA of an SD or SDXL model"
        return None

    @property
    def shape_label(self) -> str:
        return f"Z-Image-shaped, {self.transformer.config.dim} wide"
