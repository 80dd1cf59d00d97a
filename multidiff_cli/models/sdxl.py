"""The SDXL family (SDXL base, SDXL-Turbo): SD's UNet, VAE and schedulers with two text encoders and
micro-conditioning.

Besides the hidden states, SDXL's UNet takes a pooled text embedding and six "time ids" per sample
(Podell et al. 2023, §2.2: original size, crop top-left, target size). All three are rows of its
Conditioning, so guidance, chunking and LoRA sets treat them as they treat SD's hidden states.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..catalog import SDXL as SDXL_FACTS
from ..catalog import read_json
from .family import Conditioning, LoadedState
from .sd import SD, clip_truncation_warnings, encode_clip


def time_ids(size_px: tuple[int, int]) -> list[int]:
    """SDXL micro-conditioning of a picture of (height, width) px, whole and uncropped:
    original size, crop top-left (0, 0), target size, as diffusers' pipeline sets them by default.

    A panorama view gets the time ids of a whole picture of the view's size (README, *SDXL*): each
    view is denoised as a full, uncropped native-size picture, as the UNet was trained to make."""
    height, width = size_px
    return [height, width, 0, 0, height, width]


class SDXL(SD):
    """SDXL: CLIP ViT-L and OpenCLIP bigG (with projection); an empty negative prompt is zeros where the
    model's `force_zeros_for_empty_prompt` says so (model_index.json; diffusers' default: yes)."""

    facts: ClassVar = SDXL_FACTS
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    zeroed_tensors: ClassVar[tuple[str, ...]] = ("hidden_states", "pooled")
    lora_pipeline: ClassVar[str] = "StableDiffusionXLPipeline"

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, unet, vae, state: LoadedState,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__(tokenizer, text_encoder, unet, vae, state)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def from_folder(cls, folder: Path, state: LoadedState, safetensors: Callable[[str], bool]) -> SDXL:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        sd = SD.from_folder(folder, state, safetensors)
        return cls(
            tokenizer=sd.tokenizer, text_encoder=sd.text_encoder,
            tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", use_safetensors=safetensors("text_encoder_2")),
            unet=sd.unet, vae=sd.vae, state=state,
            # diffusers' StableDiffusionXLPipeline default where model_index.json does not say
            force_zeros_for_empty_prompt=bool(read_json(folder / "model_index.json").get("force_zeros_for_empty_prompt", True)),
        )

    single_file_pipeline: ClassVar[str] = "StableDiffusionXLPipeline"
    single_file_kwargs: ClassVar[dict] = {}

    @classmethod
    def from_pipeline(cls, pipe, state: LoadedState) -> SDXL:
        return cls(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, tokenizer_2=pipe.tokenizer_2,
                   text_encoder_2=pipe.text_encoder_2, unet=pipe.unet, vae=pipe.vae, state=state,
                   force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))

    def networks(self) -> dict[str, torch.nn.Module]:
        parts = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "unet": self.unet, "vae": self.vae}
        return {name: module for name, module in parts.items() if module is not None}

    def encode_prompts(self, texts: list[str], view_px: tuple[int, int]) -> Conditioning:
        """As diffusers' StableDiffusionXLPipeline.encode_prompt: both text encoders' penultimate hidden
        states, concatenated; the pooled (projected) embedding of the second; the time ids of a whole
        picture of the view's size."""
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encode_clip(tokenizer, encoder, texts, self.device, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both
            pooled = out[0]  # only the second encoder's: CLIPTextModelWithProjection's text_embeds
        hidden_states = torch.cat(hidden, dim=-1)
        ids = torch.tensor([time_ids(view_px)] * len(texts), dtype=hidden_states.dtype, device=hidden_states.device)
        return Conditioning({"hidden_states": hidden_states, "pooled": pooled, "time_ids": ids})

    def zeroed_rows(self, texts: list[str], cond: list[int], negative: list[int]) -> frozenset[int]:
        """The empty text, used only as a negative prompt (diffusers zeros a negative prompt that is not
        given; a scene's absent one is empty), under force_zeros_for_empty_prompt."""
        if not self.force_zeros_for_empty_prompt:
            return frozenset()
        return frozenset(i for i in set(negative) - set(cond) if texts[i] == "")

    def truncation_warnings(self, labelled_texts: list[tuple[str, str]]) -> list[str]:
        return clip_truncation_warnings(self.tokenizer, labelled_texts)

    def random_conditioning(self, count: int, view_px: tuple[int, int], generator: torch.Generator) -> Conditioning:
        config = self.unet.config
        hidden = super().random_conditioning(count, view_px, generator).get("hidden_states")
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled = torch.randn((count, pooled_dim), generator=generator)
        return Conditioning({"hidden_states": hidden, "pooled": pooled,
                             "time_ids": torch.tensor([time_ids(view_px)] * count, dtype=torch.float32)})

    def unet_kwargs(self, conditioning: Conditioning) -> dict[str, Any]:
        return {
            "encoder_hidden_states": conditioning.get("hidden_states"),
            "added_cond_kwargs": {"text_embeds": conditioning.get("pooled"), "time_ids": conditioning.get("time_ids")},
        }

    def lora_state_dict(self, state):
        import diffusers

        # kohya files may name the UNet's blocks as Stability's code does, mapped by the UNet's config
        return getattr(diffusers, self.lora_pipeline).lora_state_dict(state, unet_config=self.unet.config)

    def lora_mismatch(self, converted):
        hint = super().lora_mismatch(converted)
        return hint if hint and "FLUX" in hint else None

    @property
    def shape_label(self) -> str:
        return "SDXL-shaped"
