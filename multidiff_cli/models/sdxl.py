"""The SDXL family (SDXL base, SDXL-Turbo): prompt encoding with two text encoders and micro-conditioning.

The UNet, VAE, chunked calls and decoding are SD's (models/sd.py); what differs is the conditioning:
besides the hidden states, SDXL's UNet takes a pooled text embedding and six "time ids" per sample
(Podell et al. 2023, §2.2: original size, crop top-left, target size). SDXLConditioning carries all
three and slices like a tensor, so the guided denoiser and ChunkedUNet treat it as they treat SD's
hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .components import Components


@dataclass(frozen=True)
class SDXLConditioning:
    """Per sample: hidden states (E, 77, D1 + D2), pooled embedding (E, P) and time ids (E, 6)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def __getitem__(self, index) -> "SDXLConditioning":
        return SDXLConditioning(self.hidden_states[index], self.pooled[index], self.time_ids[index])

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.hidden_states.shape

    @property
    def device(self) -> torch.device:
        return self.hidden_states.device

    @classmethod
    def cat(cls, parts: list["SDXLConditioning"]) -> "SDXLConditioning":
        """The rows of every part, in order (conditions encoded in groups, e.g. one per LoRA set)."""
        return cls(*(torch.cat(tensors) for tensors in zip(*((p.hidden_states, p.pooled, p.time_ids) for p in parts))))

    def zeroed(self, rows: frozenset[int]) -> "SDXLConditioning":
        """These rows' hidden states and pooled embeddings set to zeros (force_zeros_for_empty_prompt)."""
        if not rows:
            return self
        keep = torch.tensor([i not in rows for i in range(len(self))], device=self.device)
        return SDXLConditioning(self.hidden_states * keep[:, None, None].to(self.hidden_states.dtype),
                                self.pooled * keep[:, None].to(self.pooled.dtype), self.time_ids)

    def to(self, *args, **kwargs) -> "SDXLConditioning":
        return SDXLConditioning(*(t.to(*args, **kwargs) for t in (self.hidden_states, self.pooled, self.time_ids)))

    def unet_kwargs(self) -> dict:
        """What diffusers' SDXL pipeline passes its UNet besides the latents and the timestep."""
        return {
            "encoder_hidden_states": self.hidden_states,
            "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids},
        }


def time_ids(size_px: tuple[int, int]) -> list[int]:
    """SDXL micro-conditioning of a picture of (height, width) px, whole and uncropped:
    original size, crop top-left (0, 0), target size, as diffusers' pipeline sets them by default.

    A panorama view gets the time ids of a whole picture of the view's size (README, *SDXL*): each
    view is denoised as a full, uncropped native-size picture, as the UNet was trained to make."""
    height, width = size_px
    return [height, width, 0, 0, height, width]


def encode_prompts(components: Components, texts: list[str], size_px: tuple[int, int]) -> SDXLConditioning:
    """Every text's conditioning, as diffusers' StableDiffusionXLPipeline.encode_prompt computes it.

    Both text encoders' penultimate hidden states, concatenated; the pooled (projected) embedding of
    the second (an empty negative prompt's zeros, under force_zeros_for_empty_prompt, are the
    caller's: `SDXLConditioning.zeroed`). size_px: the (height, width) of the pictures the UNet
    denoises (time_ids)."""
    hidden, pooled = [], None
    pairs = ((components.tokenizer, components.text_encoder), (components.tokenizer_2, components.text_encoder_2))
    with torch.inference_mode():
        for tokenizer, encoder in pairs:
            tokens = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            )
            out = encoder(tokens.input_ids.to(components.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both
            pooled = out[0]  # only the second encoder's: CLIPTextModelWithProjection's text_embeds
        hidden_states = torch.cat(hidden, dim=-1)
    ids = torch.tensor([time_ids(size_px)] * len(texts), dtype=hidden_states.dtype, device=hidden_states.device)
    return SDXLConditioning(hidden_states, pooled, ids)


def empty_negatives(texts: list[str], cond: list[int], negative: list[int]) -> frozenset[int]:
    """The texts that are zeros under force_zeros_for_empty_prompt: the empty text, used only as a negative
    prompt (diffusers zeros a negative prompt that is not given; a scene's absent one is empty)."""
    return frozenset(i for i in set(negative) - set(cond) if texts[i] == "")
