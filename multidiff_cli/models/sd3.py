"""The SD3.5 family (medium, large, large-turbo): two CLIP encoders and T5, joined as StableDiffusion3Pipeline
joins them; an MMDiT transformer that patchifies 2x2 cells itself; ordinary classifier-free guidance
(N+2 samples a step, the unconditional shared); flow matching with a static shift.

Skip-layer guidance (StableDiffusion3Pipeline's skip_guidance_layers) is not supported: it would need a
second conditional pass per prompt with layers skipped, which the scene has no key for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..catalog import SD3 as SD3_FACTS
from ..method.schedule import FlowSchedule
from .codec import VAECodec
from .conditioning import Conditioning
from .family import LoadedState, Model
from .flux import calculate_shift, flow_first_step
from .schedulers import make_scheduler
from .sd import clip_truncation_warnings, encode_clip

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length
TRANSFORMER_MULTIPLICITY = 24  # live tensors per token and width, per sample (an estimate, unmeasured)


class SD3(Model):
    """SD3.5: CLIP ViT-L and OpenCLIP bigG (both with projection), T5 v1.1 XXL (optional), SD3Transformer2DModel,
    AutoencoderKL (16 channels, with a shift factor)."""

    facts: ClassVar = SD3_FACTS
    denoiser_part: ClassVar[str] = "transformer"
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    network_label: ClassVar[str] = "transformer"
    single_file_pipeline: ClassVar[str] = "StableDiffusion3Pipeline"
    single_file_kwargs: ClassVar[dict] = {}

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, tokenizer_3, text_encoder_3, transformer,
                 vae, state: LoadedState):
        super().__init__(state)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3
        self.transformer, self.vae = transformer, vae

    @classmethod
    def from_folder(cls, folder: Path, state: LoadedState, safetensors: Callable[[str], bool]) -> SD3:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        with_t5 = (folder / "text_encoder_3").is_dir()  # SD3 renders without T5 (zeros in its place)
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder",
                                                                     use_safetensors=safetensors("text_encoder")),
            tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                                       use_safetensors=safetensors("text_encoder_2")),
            tokenizer_3=T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3") if with_t5 else None,
            text_encoder_3=T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3",
                                                          use_safetensors=safetensors("text_encoder_3")) if with_t5 else None,
            transformer=SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                              use_safetensors=safetensors("transformer")),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=safetensors("vae")),
            state=state,
        )

    @classmethod
    def from_pipeline(cls, pipe, state: LoadedState) -> SD3:
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.tokenizer_3,
                   pipe.text_encoder_3, pipe.transformer, pipe.vae, state)

    def networks(self) -> dict[str, torch.nn.Module]:
        parts = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                 "text_encoder_3": self.text_encoder_3, "transformer": self.transformer, "vae": self.vae}
        return {name: module for name, module in parts.items() if module is not None}

    # --- prompts

    def encode_prompts(self, texts: list[str], view_px: tuple[int, int]) -> Conditioning:
        """As StableDiffusion3Pipeline.encode_prompt: both CLIP encoders' penultimate hidden states side by
        side, padded to T5's width, then T5's hidden states after them (zeros without T5); the two CLIP
        projections side by side as the pooled embedding."""
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encode_clip(tokenizer, encoder, texts, self.device, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.text_encoder.dtype))
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        width = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is None:
            t5 = torch.zeros((len(texts), MAX_SEQUENCE_LENGTH, width), device=self.device, dtype=clip.dtype)
        else:
            tokens = self.tokenizer_3(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                      add_special_tokens=True, return_tensors="pt")
            with torch.inference_mode():
                t5 = self.text_encoder_3(tokens.input_ids.to(self.device))[0].to(self.text_encoder_3.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning({"hidden_states": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)})

    def truncation_warnings(self, labelled_texts: list[tuple[str, str]]) -> list[str]:
        notes = clip_truncation_warnings(self.tokenizer, labelled_texts)
        if self.tokenizer_3 is not None:
            for label, text in labelled_texts:
                ids = self.tokenizer_3(text, truncation=False, verbose=False).input_ids
                if len(ids) > MAX_SEQUENCE_LENGTH:
                    notes.append(f"{label} is {len(ids) - 1} tokens, over T5's {MAX_SEQUENCE_LENGTH - 1}: cut there")
        return notes

    def random_conditioning(self, count: int, view_px: tuple[int, int], generator: torch.Generator) -> Conditioning:
        config = self.transformer.config
        hidden = torch.randn((count, 77 + MAX_SEQUENCE_LENGTH, config.joint_attention_dim), generator=generator)
        return Conditioning({"hidden_states": hidden,
                             "pooled": torch.randn((count, config.pooled_projection_dim), generator=generator)})

    # --- the denoiser

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def native_cells(self) -> int:
        return int(self.transformer.config.sample_size)

    def forward(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer as StableDiffusion3Pipeline calls it: the timestep itself (0..1000), the latents
        unpatchified (it patchifies inside, its position embedding cropped to the view's size)."""
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=inputs.to(dtype), timestep=t.expand(inputs.shape[0]),
            encoder_hidden_states=conditioning.get("hidden_states"), pooled_projections=conditioning.get("pooled"),
            return_dict=False,
        )[0].float()

    def bytes_per_sample(self, view_cells: int) -> int:
        config = self.transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        tokens = view_cells // config.patch_size**2 + 77 + MAX_SEQUENCE_LENGTH
        return tokens * width * (torch.finfo(self.dtype).bits // 8) * TRANSFORMER_MULTIPLICITY

    # --- schedules and the codec

    def make_schedule(self, name: str, steps: int, view_hw: tuple[int, int]) -> FlowSchedule:
        """The scheduler's own sigmas (SD3.5's static shift); where its config shifts dynamically, `mu`
        from the view's token count, as StableDiffusion3Pipeline computes it for a picture of that size."""
        scheduler = make_scheduler(name, self.scheduler_config, self.facts.schedulers)
        config, kwargs = scheduler.config, {}
        if config.get("use_dynamic_shifting"):
            patch = self.transformer.config.patch_size
            kwargs["mu"] = calculate_shift((view_hw[0] // patch) * (view_hw[1] // patch),
                                           config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                           config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        schedule = FlowSchedule(scheduler)
        schedule.set_timesteps(steps, device=self.device, **kwargs)
        return schedule

    def first_step(self, steps: int, strength: float) -> int:
        return flow_first_step(steps, strength)

    @property
    def codec(self) -> VAECodec:
        return VAECodec(self.vae, self.facts.cell_px)

    # --- LoRAs

    def load_lora(self, state, adapter_name):
        import diffusers

        if any(key.startswith(("lora_unet_", "lora_te")) for key in state):
            raise ValueError("it is a kohya LoRA, and diffusers has no kohya conversion for SD3: use a LoRA in "
                             "the diffusers/peft layout")
        pipeline = diffusers.StableDiffusion3Pipeline
        converted = pipeline.lora_state_dict(state)
        if not converted or not all("lora" in key for key in converted):
            raise ValueError("no LoRA layers in it")
        pipeline.load_lora_into_transformer(converted, self.transformer, adapter_name=adapter_name)
        for part in ("text_encoder", "text_encoder_2"):
            if getattr(self, part) is not None:
                pipeline.load_lora_into_text_encoder(converted, None, getattr(self, part), prefix=part,
                                                     adapter_name=adapter_name)
        return converted

    def lora_mismatch(self, converted):
        if any(key.startswith("unet.") for key in converted):
            return "it names a UNet (unet. layers): a LoRA of an SD or SDXL model"
        return None

    @property
    def shape_label(self) -> str:
        config = self.transformer.config
        return f"SD3-shaped, {config.num_attention_heads * config.attention_head_dim} wide"
