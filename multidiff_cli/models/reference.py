"""IP-Adapters (Ye et al. 2023) on the samples of the prompts that ask for them: a reference picture per
subject or for the whole scene.

Loaded through diffusers' `load_ip_adapter` (on a pipeline made of the model's own parts), with each
adapter's CLIP image encoder from its repo or folder. The sampler never hears of them. Each condition
carries a 0/1 row of the references it runs with ("reference", (E, R)) and each reference's image
embedding ("ip_<r>": the picture's for a conditional row, the unconditional one — zeros, or a black
picture's for IP-Adapter Plus — for a negative row, as diffusers' pipelines guide). A family's
forward runs each group of rows with one set of references through the UNet with the IP attention on
at those references' scales (the others at 0), and the rows without a reference through the bare
UNet: its own attention processors, no image projection, so nothing of the IP branch reaches them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import ControlError, ModelNotFound
from .conditioning import Conditioning
from .control import diffusers_quiet, set_rows

if TYPE_CHECKING:
    from .family import Model


@dataclass(frozen=True)
class ReferenceSpec:
    """One reference of a scene, resolved: the adapter's repo or folder, its weight file inside it, the
    image encoder's folder inside it, the picture, and the scale."""

    root: str  # hub id or local folder
    weight: str  # the weight file's path inside root ("models/ip-adapter_sd15.safetensors")
    image_encoder: str  # the encoder's folder inside root ("models/image_encoder")
    image: Path
    scale: float


@dataclass
class IPState:
    """The IP-Adapters loaded into a model's UNet: which (root, weight) pairs, in order, and the UNet's
    attention processors and image projection with and without them."""

    loaded: tuple[tuple[str, str], ...] = ()
    plain: dict[str, Any] = field(default_factory=dict)
    ip: dict[str, Any] = field(default_factory=dict)
    projection: Any = None
    encoders: dict[tuple[str, str], tuple[Any, Any]] = field(default_factory=dict)  # -> (CLIP encoder, processor)


@dataclass(frozen=True)
class References:
    """A render's references, as its forward uses them: their scales (reference r is adapter r)."""

    scales: tuple[float, ...]
    state: IPState


def split_weight(weight: str) -> tuple[str, str]:
    """(subfolder, file name) of a weight path inside a repo ("models/ip-adapter_sd15.safetensors")."""
    path = Path(weight)
    return ("" if str(path.parent) == "." else path.parent.as_posix()), path.name


def _state(model: Model) -> IPState:
    if model.state.ip_state is None:
        model.state.ip_state = IPState()
    return model.state.ip_state


def _pipeline(model: Model):
    """A diffusers pipeline of the model's own parts, for its IPAdapterMixin (nothing is copied)."""
    import diffusers

    from .schedulers import make_scheduler

    parts = dict(model.networks())
    names = {"tokenizer": getattr(model, "tokenizer", None), "tokenizer_2": getattr(model, "tokenizer_2", None)}
    pipeline = getattr(diffusers, model.facts.pipelines[0])
    scheduler = make_scheduler(model.facts.default_scheduler, model.scheduler_config, model.facts.schedulers)
    kwargs = {"scheduler": scheduler, "image_encoder": None, "feature_extractor": None}
    if model.facts.name == "sd":
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    accepted = set(pipeline.__init__.__code__.co_varnames)
    return pipeline(**{k: v for k, v in {**parts, **names, **kwargs}.items() if k in accepted})


def load_references(model: Model, specs: list[ReferenceSpec], allow_pickle: bool = False) -> References:
    """Load the IP-Adapters of `specs` (one adapter per reference, in order) into the model's UNet unless these
    are already there, and each distinct image encoder; the UNet is left bare (IP attention off) between calls.
    ControlError (exit 2) for a weight that is no IP-Adapter of this model; ModelNotFound where it cannot be had."""
    state = _state(model)
    wanted = tuple((spec.root, spec.weight) for spec in specs)
    unet = model.denoiser
    if wanted != state.loaded:
        _bare(unet)
        if not state.plain:
            state.plain = dict(unet.attn_processors)
        unet.set_attn_processor(dict(state.plain))
        subfolders, names = zip(*(split_weight(spec.weight) for spec in specs))
        for spec in specs:
            if not spec.weight.endswith(".safetensors") and not allow_pickle:
                raise ControlError([f"IP-Adapter {spec.root} {spec.weight}: a pickle, which can run code when loaded: "
                                    "use its .safetensors file, or, for a file you trust, pass --allow-pickle"])
        try:
            with diffusers_quiet():
                _pipeline(model).load_ip_adapter([spec.root for spec in specs], list(subfolders), list(names),
                                                 image_encoder_folder=None)
        except (OSError, ValueError) as exc:
            unet.set_attn_processor(dict(state.plain))
            _bare(unet)
            state.loaded = ()
            reason = _reason(exc)
            adapters = ", ".join(dict.fromkeys(f"{spec.root} {spec.weight}" for spec in specs))
            if isinstance(exc, ValueError) or "shape" in reason:
                raise ControlError([f"IP-Adapter {adapters}: not an IP-Adapter for this model ({model.model_id}, "
                                    f"{model.shape_label}): {reason}"]) from None
            raise ModelNotFound(f"IP-Adapter {adapters}: cannot load it ({reason}); a hub id needs the network once (or its "
                                "files in the Hugging Face cache); offline, point `model:` at a local folder") from None
        state.ip, state.projection, state.loaded = dict(unet.attn_processors), unet.encoder_hid_proj, wanted
        _bare(unet)
        unet.set_attn_processor(dict(state.plain))
    for spec in specs:
        key = (spec.root, spec.image_encoder)
        if key not in state.encoders:
            state.encoders[key] = _image_encoder(spec, model)
    return References(tuple(spec.scale for spec in specs), state)


_SHAPE = re.compile(r"([\w.]+) expected shape (?:torch\.Size\(\[|.*?size=\()([\d, ]+)[\])].*?but got "
                    r"torch\.Size\(\[([\d, ]+)\]\)")


def _reason(exc: Exception) -> str:
    """The telling part of a loading error: a shape mismatch as `layer is [..] in the file, [..] in the model`,
    else its first line, cut at a word."""
    text = " ".join(str(exc).split())
    shape = _SHAPE.search(text)
    if shape:
        layer, ours, theirs = shape.groups()
        return f"{layer} is [{theirs}] in the file, [{ours}] in the model"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return first if len(first) <= 200 else first[:200].rsplit(" ", 1)[0] + " ..."


def _bare(unet) -> None:
    """The UNet without its image projection, as before any IP-Adapter (its processors are set apart)."""
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None


def _image_encoder(spec: ReferenceSpec, model: Model):
    """The CLIP image encoder of an adapter (from its repo or folder) and its processor, as diffusers'
    load_ip_adapter makes them (CLIPImageProcessor at the encoder's image size)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(spec.root, subfolder=spec.image_encoder,
                                                                use_safetensors=True)
    except OSError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelNotFound(f"IP-Adapter {spec.root}: no image encoder in {spec.image_encoder or 'its top folder'} "
                            f"({first[:160]}); name its folder with `image_encoder:`") from None
    size = encoder.config.image_size
    processor = CLIPImageProcessor(size=size, crop_size=size)
    return encoder.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False), processor


def image_embeddings(model: Model, references: References, specs: list[ReferenceSpec]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each reference's (picture, unconditional) embedding as its adapter's projection takes it, one row each,
    as diffusers' encode_image makes them: the encoder's image embeds (unconditional: zeros), or for adapters
    that read hidden states (IP-Adapter Plus) its penultimate hidden states (unconditional: a black picture's)."""
    from diffusers.models.embeddings import ImageProjection
    from PIL import Image

    layers = references.state.projection.image_projection_layers
    out = []
    for spec, layer in zip(specs, layers):
        encoder, processor = references.state.encoders[(spec.root, spec.image_encoder)]
        with Image.open(spec.image) as picture:
            pixels = processor(picture.convert("RGB"), return_tensors="pt").pixel_values
        pixels = pixels.to(device=model.device, dtype=next(encoder.parameters()).dtype)
        with torch.inference_mode():
            if isinstance(layer, ImageProjection):
                embeds = encoder(pixels).image_embeds
                negative = torch.zeros_like(embeds)
            else:
                embeds = encoder(pixels, output_hidden_states=True).hidden_states[-2]
                negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        out.append((embeds[None], negative[None]))
    return out


def reference_rows(conditioning: Conditioning, sets: list[tuple[int, ...]], negative: list[bool],
                   embeddings: list[tuple[torch.Tensor, torch.Tensor]]) -> Conditioning:
    """The conditioning with each row's references ("reference", (E, R) 0/1) and each reference's embedding
    ("ip_<r>"): the picture's on a conditional row that uses it, the unconditional one on a negative row,
    zeros where the row does not use it (never read: that adapter runs at scale 0 there)."""
    device = next(iter(conditioning.tensors.values())).device
    tensors = {"reference": set_rows(sets, len(embeddings)).to(device)}
    for r, (embeds, unconditional) in enumerate(embeddings):
        rows = [(unconditional if neg else embeds) if r in rs else torch.zeros_like(embeds)
                for rs, neg in zip(sets, negative)]
        tensors[f"ip_{r}"] = torch.cat(rows).to(device)
    out = conditioning
    for name, tensor in tensors.items():
        out = out.with_rows(name, tensor)
    return out


def by_reference_set(unet, references: References | None, conditioning: Conditioning, inputs: torch.Tensor,
                     call: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]) -> torch.Tensor:
    """`call(rows, extra)` for each group of rows with one set of references, with the IP attention on at
    those references' scales (extra: the UNet's image_embeds); the rows without one with the UNet bare.
    Outputs in row order; the UNet is left bare."""
    if references is None or "reference" not in conditioning.tensors:
        return call(torch.arange(inputs.shape[0], device=inputs.device), {})
    uses = conditioning.get("reference")
    patterns, index = torch.unique(uses, dim=0, return_inverse=True)
    out = None
    state = references.state
    try:
        for k, pattern in enumerate(patterns):
            rows = (index == k).nonzero().flatten()
            if pattern.any():
                scales = [float(s) * float(on) for s, on in zip(references.scales, pattern.tolist())]
                _ip_on(unet, state, scales)
                embeds = [conditioning.get(f"ip_{r}")[rows] for r in range(len(references.scales))]
                part = call(rows, {"image_embeds": embeds})
            else:
                _ip_off(unet, state)
                part = call(rows, {})
            if out is None:
                out = part.new_empty((inputs.shape[0], *part.shape[1:]))
            out[rows] = part
    finally:
        _ip_off(unet, state)
    return out


def _ip_on(unet, state: IPState, scales: list[float]) -> None:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    for processor in state.ip.values():
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            processor.scale = list(scales)
    unet.set_attn_processor(dict(state.ip))
    unet.encoder_hid_proj = state.projection
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def _ip_off(unet, state: IPState) -> None:
    if unet.encoder_hid_proj is not None:
        unet.set_attn_processor(dict(state.plain))
        _bare(unet)


# --- random IP-Adapters (tests, the offline example) ---------------------------------------------------------

RANDOM_WEIGHT = "models/ip-adapter_random.safetensors"


def save_random_ip_adapter(unet, folder: Path, seed: int = 0, weight: str = RANDOM_WEIGHT, tokens: int = 4) -> Path:
    """An IP-Adapter with random weights for `unet`, written in h94/IP-Adapter's layout: the weight file (an
    image projection to `tokens` tokens, and to_k_ip/to_v_ip for every cross-attention layer, numbered as
    diffusers reads them) and a small CLIP image encoder in image_encoder/ beside it. Returns the weight file."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cross = unet.config.cross_attention_dim
    path = Path(folder) / weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8))
        state = {"image_proj.proj.weight": torch.randn(cross * tokens, 32) * 0.2,
                 "image_proj.proj.bias": torch.randn(cross * tokens) * 0.2,
                 "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
        key = 1  # diffusers numbers every attention processor and reads the cross-attention ones: 1, 3, 5, ...
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
            for part in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key}.{part}.weight"] = torch.randn(hidden, cross) * 0.2
            key += 2
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    encoder.save_pretrained(path.parent / "image_encoder", safe_serialization=True)
    return path
