"""The FLUX.1 family (dev and schnell): CLIP's pooled output and T5's hidden states, a flow-matching
transformer over packed 2x2 latent patches, a 16-channel VAE with a shift factor.

The sampler fuses velocities on the unpacked 16-channel latent grid (8 px cells): packing is a pure
reshuffle of cells, so masks, views and weights are those of every other family. `forward` packs each
view's 2x2 patches, builds that view's position ids (0-based, as for a picture of the view's size)
and unpacks the transformer's output. FLUX.1-dev embeds its guidance: the scene's guidance_scale is
a row of the conditioning (one value per sample), and there is no unconditional pass unless
true_cfg_scale asks for one (FluxPipeline's true CFG).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..catalog import FLUX as FLUX_FACTS
from ..method.schedule import FlowSchedule
from .codec import VAECodec
from .conditioning import Conditioning
from .family import LoadedState, Model
from .schedulers import make_scheduler
from .sd import clip_truncation_warnings, encode_clip

# A LoRA key of an SD/SDXL UNet: diffusers' unet.*, or kohya's lora_unet_ with diffusers' or the original blocks
SD_UNET_LORA_KEY = re.compile(r"unet\.|lora_unet_(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|"
                              r"middle_block)_")
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length: every prompt of a render is padded to it
# Live activation tensors per token and width of the transformer, per sample (an estimate, unmeasured):
# the joint blocks hold the image and text streams, their attention (SDPA, no quadratic matrix) and
# MLPs of 4x the width.
TRANSFORMER_MULTIPLICITY = 24


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's dynamic shift `mu` for a picture of `image_seq_len` packed tokens (FluxPipeline's rule)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def flow_first_step(steps: int, strength: float) -> int:
    """The step a flow img2img pipeline (FLUX's, SD3's) starts at: int(steps - steps * strength) (strength
    0.6 of 4 steps runs 3, where SD's pipeline runs 2); at least one step runs."""
    return min(steps - 1, int(max(steps - steps * strength, 0)))


def pipeline_flow_schedule(model, name: str, steps: int, mu: Callable[[Any], float]) -> FlowSchedule:
    """Scheduler `name` from the model's config on the sigmas FluxPipeline, ZImagePipeline and Flux2KleinPipeline
    pass (1 .. 1/steps; a scheduler that makes its own flow sigmas keeps them), shifted by mu(its config) where
    the config shifts dynamically, its timesteps set on the model's device."""
    import numpy as np

    scheduler = make_scheduler(name, model.scheduler_config, model.facts.schedulers)
    config = scheduler.config
    kwargs = {} if config.get("use_flow_sigmas") else {"sigmas": np.linspace(1.0, 1 / steps, steps)}
    if config.get("use_dynamic_shifting"):
        kwargs["mu"] = mu(config)
    schedule = FlowSchedule(scheduler)
    schedule.set_timesteps(steps, device=model.device, **kwargs)
    return schedule


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch of cells one token, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of a picture of h x w cells: (0, row, column) of each packed token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def build_random_flux_controlnet(transformer, seed: int = 0):
    """A FLUX ControlNet shaped for `transformer` (InstantX's kind: one joint and one single block, its inputs the
    control image's VAE latents), with random weights: diffusers' `from_transformer` copies the transformer's
    embedders and first blocks and zeroes what carries the residuals out; here those get random weights too
    (PyTorch's default initialisation, seeded), so the residuals are not zero."""
    from diffusers import FluxControlNetModel

    config = transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=config.attention_head_dim,
                                                   num_attention_heads=config.num_attention_heads)
        for linear in [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]:
            linear.reset_parameters()
    return net.eval()


def flux_control_samples(controls: tuple, hidden: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                         common: dict[str, Any], hw: tuple[int, int], default_guidance: float) -> dict[str, Any]:
    """The transformer's extra inputs for a batch: each control on at t runs its FLUX ControlNet on the rows that use
    it (their packed inputs, text, and guide crops) and its block samples, scaled, are summed into theirs (zeros on
    the other rows, which adding leaves as they were), as FluxMultiControlNetModel sums them. {} where none runs."""
    if not controls or "control" not in conditioning.tensors:
        return {}
    uses, guides = conditioning.get("control"), conditioning.get("guides")
    joint = single = None
    repeat = False
    for k, control in enumerate(controls):
        rows = uses[:, k].nonzero().flatten()
        if rows.numel() == 0 or not control.runs_at(t):
            continue
        net = control.net
        guide = guides[rows, slice(*control.channels)].to(net.dtype)
        cond = pack(guide) if net.input_hint_block is None else torch.nn.functional.pixel_shuffle(guide, 8)
        guidance = None
        if net.config.guidance_embeds:  # FluxControlNetPipeline: the scene's guidance where the net embeds it
            values = conditioning.get("guidance") if "guidance" in conditioning.tensors else None
            guidance = (values[rows] if values is not None else
                        torch.full((rows.numel(),), default_guidance, device=hidden.device)).to(torch.float32)
        kwargs = {name: value[rows] if name in ("timestep", "pooled_projections", "encoder_hidden_states") else value
                  for name, value in common.items()}
        block, single_block = net(hidden_states=hidden[rows], controlnet_cond=cond, conditioning_scale=control.scale,
                                  guidance=guidance, return_dict=False, **kwargs)
        if joint is None:
            joint = [s.new_zeros((hidden.shape[0], *s.shape[1:])) for s in block] if block is not None else None
            single = ([s.new_zeros((hidden.shape[0], *s.shape[1:])) for s in single_block]
                      if single_block is not None else None)
            repeat = net.input_hint_block is not None  # XLabs' ControlNets repeat their blocks over the model's
        for totals, part in ((joint, block), (single, single_block)):
            for total, sample in zip(totals or [], part or []):
                total[rows] += sample
    if joint is None and single is None:
        return {}
    return {"controlnet_block_samples": joint, "controlnet_single_block_samples": single,
            "controlnet_blocks_repeat": repeat}


class Flux(Model):
    """FLUX.1: CLIP ViT-L (pooled), T5 v1.1 XXL (hidden states), FluxTransformer2DModel, AutoencoderKL (16 ch)."""

    facts: ClassVar = FLUX_FACTS
    denoiser_part: ClassVar[str] = "transformer"
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    network_label: ClassVar[str] = "transformer"
    single_file_pipeline: ClassVar[str] = "FluxPipeline"  # a BFL/ComfyUI file holds the transformer (and maybe more)
    single_file_kwargs: ClassVar[dict] = {}
    lora_pipeline: ClassVar[str] = "FluxPipeline"

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, transformer, vae, state: LoadedState):
        super().__init__(state)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.transformer, self.vae = transformer, vae

    @classmethod
    def from_folder(cls, folder: Path, state: LoadedState, safetensors: Callable[[str], bool]) -> Flux:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                       use_safetensors=safetensors("text_encoder")),
            tokenizer_2=T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2"),
            text_encoder_2=T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2",
                                                          use_safetensors=safetensors("text_encoder_2")),
            transformer=FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                               use_safetensors=safetensors("transformer")),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=safetensors("vae")),
            state=state,
        )

    @classmethod
    def from_pipeline(cls, pipe, state: LoadedState) -> Flux:
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.transformer,
                   pipe.vae, state)

    def networks(self) -> dict[str, torch.nn.Module]:
        parts = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                 "transformer": self.transformer, "vae": self.vae}
        return {name: module for name, module in parts.items() if module is not None}

    # --- prompts

    @property
    def embedded_guidance(self) -> bool:
        """FLUX.1-dev embeds its guidance; schnell, distilled further, has none."""
        return bool(self.transformer.config.guidance_embeds)

    def encode_prompts(self, texts: list[str], view_px: tuple[int, int]) -> Conditioning:
        """As FluxPipeline.encode_prompt: CLIP's pooled output, and T5's last hidden states of every text
        padded to MAX_SEQUENCE_LENGTH (pad tokens are attended, so every prompt of a render has one length)."""
        pooled = encode_clip(self.tokenizer, self.text_encoder, texts, self.device).pooler_output
        tokens = self.tokenizer_2(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                  return_tensors="pt")
        with torch.inference_mode():
            hidden = self.text_encoder_2(tokens.input_ids.to(self.device), output_hidden_states=False)[0]
        return Conditioning({"t5": hidden.to(self.text_encoder_2.dtype), "pooled": pooled.to(self.text_encoder.dtype)})

    def with_guidance(self, conditioning: Conditioning, guidance: list[float]) -> Conditioning:
        """The conditioning with each row's embedded guidance (FLUX.1-dev's `guidance` input)."""
        values = torch.tensor(guidance, dtype=torch.float32, device=conditioning.get("t5").device)
        return Conditioning({**conditioning.tensors, "guidance": values}, conditioning.adapter_index,
                            conditioning.adapter_sets)

    def truncation_warnings(self, labelled_texts: list[tuple[str, str]]) -> list[str]:
        """T5 reads MAX_SEQUENCE_LENGTH tokens (CLIP's 77 give the pooled embedding only: its cut is noted too)."""
        notes = []
        for label, text in labelled_texts:
            ids = self.tokenizer_2(text, truncation=False, verbose=False).input_ids
            if len(ids) > MAX_SEQUENCE_LENGTH:
                kept = self.tokenizer_2.decode(ids[: MAX_SEQUENCE_LENGTH - 1], skip_special_tokens=True)
                notes.append(f"{label} is {len(ids) - 1} tokens, over T5's {MAX_SEQUENCE_LENGTH - 1}: cut after "
                             f"'...{kept[-40:]}'")
        return notes + [note.replace("text encoder's", "CLIP encoder's (the pooled embedding)")
                        for note in clip_truncation_warnings(self.tokenizer, labelled_texts)]

    def random_conditioning(self, count: int, view_px: tuple[int, int], generator: torch.Generator) -> Conditioning:
        config = self.transformer.config
        t5 = torch.randn((count, MAX_SEQUENCE_LENGTH, config.joint_attention_dim), generator=generator)
        pooled = torch.randn((count, config.pooled_projection_dim), generator=generator)
        conditioning = Conditioning({"t5": t5, "pooled": pooled})
        return self.with_guidance(conditioning, [self.facts.default_guidance] * count)

    # --- the denoiser

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    @property
    def native_cells(self) -> int:
        """1024 px for FLUX.1: the size it was trained at (its VAE's sample_size), in cells."""
        return int(self.vae.config.sample_size) // self.facts.cell_px

    def forward(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                controls: tuple = ()) -> torch.Tensor:
        """The transformer on packed views, as FluxPipeline calls it: timestep t/1000, the guidance rows
        where the model embeds guidance, the view's own position ids; the velocity unpacked. With controls,
        each one's FLUX ControlNet block samples added to the rows that use it (FluxControlNetPipeline)."""
        b, _, h, w = inputs.shape
        dtype = self.transformer.dtype
        hidden = pack(inputs.to(dtype))
        timestep = t.expand(b).to(dtype) / 1000
        guidance = conditioning.get("guidance").to(torch.float32) if self.embedded_guidance else None
        t5 = conditioning.get("t5")
        common = dict(timestep=timestep, pooled_projections=conditioning.get("pooled"), encoder_hidden_states=t5,
                      txt_ids=torch.zeros(t5.shape[1], 3, device=t5.device, dtype=t5.dtype),
                      img_ids=image_ids(h, w, inputs.device, dtype))
        samples = flux_control_samples(controls, hidden, t, conditioning, common, (h, w), self.facts.default_guidance)
        out = self.transformer(hidden_states=hidden, guidance=guidance, return_dict=False, **common, **samples)[0]
        return unpack(out, h, w).float()

    def bytes_per_sample(self, view_cells: int) -> int:
        """TRANSFORMER_MULTIPLICITY live tensors of the transformer's width per token (image and text)."""
        config = self.transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        tokens = view_cells // 4 + MAX_SEQUENCE_LENGTH
        return tokens * width * (torch.finfo(self.dtype).bits // 8) * TRANSFORMER_MULTIPLICITY

    # --- ControlNets

    controlnet_class: ClassVar[str] = "FluxControlNetModel"

    def random_controlnet(self, seed: int = 0):
        return build_random_flux_controlnet(self.transformer, seed)

    def control_mismatch(self, net) -> str | None:
        theirs, ours = net.config, self.transformer.config
        for key, what in (("joint_attention_dim", "text width"), ("in_channels", "latent channels"),
                          ("pooled_projection_dim", "pooled text width")):
            if getattr(theirs, key) != getattr(ours, key):
                return f"its {what} is {getattr(theirs, key)}, this model's {getattr(ours, key)}"
        if getattr(theirs, "num_mode", None) is not None:
            return "a ControlNet Union (it needs a control mode per image, which multidiff does not give yet)"
        return None

    def control_guide(self, net, pixels: torch.Tensor) -> torch.Tensor:
        """As FluxControlNetPipeline prepares a control image: normalised to [-1, 1]; for a ControlNet without
        an input hint block (InstantX's) encoded by the VAE ((mean - shift) * scale: its 16 channels per
        cell, packed in `forward`), for one with (XLabs') the pixels, unshuffled 8x8 per cell."""
        normalised = pixels * 2 - 1
        if net.input_hint_block is None:
            return self.codec.encode(normalised)
        return torch.nn.functional.pixel_unshuffle(normalised, self.facts.cell_px)

    # --- schedules and the codec

    def make_schedule(self, name: str, steps: int, view_hw: tuple[int, int]) -> FlowSchedule:
        """As FluxPipeline: sigmas 1 .. 1/steps, shifted by `mu` from the view's token count (not the
        canvas's: a 4096x1024 canvas would shift almost the whole schedule to pure noise)."""
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

        pipeline = diffusers.FluxPipeline  # its conversion reads diffusers/peft, kohya and XLabs files
        try:
            converted, alphas = pipeline.lora_state_dict(state, return_alphas=True)
        except ValueError:  # kohya's conversion refuses an SD LoRA's lora_unet_ keys ("Incompatible keys")
            hint = self.lora_mismatch(state)
            if hint:
                raise ValueError(hint) from None
            raise
        if not converted or not all("lora" in key for key in converted):
            raise ValueError("no LoRA layers in it")
        pipeline.load_lora_into_transformer(converted, alphas, self.transformer, adapter_name=adapter_name)
        if self.text_encoder is not None:
            pipeline.load_lora_into_text_encoder(converted, alphas, self.text_encoder, prefix="text_encoder",
                                                 adapter_name=adapter_name)
        return converted

    def lora_mismatch(self, converted):
        """An SD or SDXL LoRA: UNet layers in diffusers' keys, or kohya's keys of a UNet's blocks (FLUX's kohya
        files are lora_unet_ too, of double_blocks and single_blocks)."""
        if any(SD_UNET_LORA_KEY.match(key) for key in converted):
            return "it names a UNet (unet. layers): a LoRA of an SD or SDXL model"
        return None

    @property
    def shape_label(self) -> str:
        config = self.transformer.config
        return f"FLUX.1-shaped, {config.num_attention_heads * config.attention_head_dim} wide"


