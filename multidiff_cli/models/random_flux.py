"""Flow-matching transformers with random weights, built in code. FLUX.1: `tiny-flux-random` (dev-shaped:
guidance embedded), `tiny-flux-schnell-random` (schnell-shaped), `flux-random` (FLUX.1's width, fewer blocks: the
bench's full-width model). SD3.5: `tiny-sd3-random` and `sd3-random` (SD3.5-medium's transformer shape).
Z-Image: `tiny-zimage-random`, `tiny-zimage-turbo-random` and `zimage-random` (Z-Image's width, fewer layers).
FLUX.2 klein: `tiny-flux2-klein-random` (distilled), `tiny-flux2-klein-base-random` and `flux2-klein-random`."""
from __future__ import annotations

from typing import Any

import torch

from ..catalog import FLUX_RANDOM, FLUX_RANDOM_BLOCKS, TINY_FLUX_RANDOM, TINY_FLUX_SCHNELL_RANDOM
from .family import LoadedState
from .flux import Flux
from .names import TOKENIZER_WORDS

T5_SPECIALS = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's ids 0, 1, 2


def t5_tokenizer():
    """A T5 Unigram tokenizer built in code from (piece, score) pairs: a piece for each of the ~1500 words
    of tiny-random's tokenizer (names.TOKENIZER_WORDS), likelier than spelling it, and every printable
    ASCII character, so every text encodes; no sentencepiece model file."""
    from transformers import T5Tokenizer

    words = [(f"\u2581{word}", -1.0 - i / len(TOKENIZER_WORDS)) for i, word in enumerate(TOKENIZER_WORDS)]
    characters = [(chr(c), -10.0) for c in range(33, 127)] + [("\u2581", -5.0)]
    return T5Tokenizer(vocab=T5_SPECIALS + words + characters, extra_ids=0)


def flux_scheduler_config(schnell: bool = False) -> dict[str, Any]:
    """The scheduler config FLUX.1-dev ships (schnell: a fixed shift of 1, no dynamic shifting)."""
    shift = {"shift": 1.0, "use_dynamic_shifting": False} if schnell else {"shift": 3.0, "use_dynamic_shifting": True}
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "base_image_seq_len": 256,
            "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15, **shift}


def flux_vae(tiny: bool, sample_size: int):
    """FLUX.1's AutoencoderKL shape (16 latent channels, no quant convs, its scaling and shift factors),
    with random weights; tiny: 8 channels a level."""
    from diffusers import AutoencoderKL

    shape = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4} if tiny else {
        "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
        sample_size=sample_size, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, **shape,
    )


def build_tiny_flux_random(seed: int = 0, schnell: bool = False, native_px: int = 256) -> Flux:
    """FLUX.1-shaped components with small random weights (tests, `--model tiny-flux-random`): CLIP and T5
    text encoders over tokenizers built in code, a two-block FluxTransformer2DModel (one joint, one single)
    with rotary axes (4, 6, 6), the 16-channel VAE; native window native_px (FLUX.1's is 1024)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from .random_text import TINY_TEXT, clip_config, tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = tiny_tokenizer(), t5_tokenizer()
        text_encoder = CLIPTextModel(clip_config(tokenizer, len(tokenizer), **TINY_TEXT))
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0,
                                                 eos_token_id=1, decoder_start_token_id=0))
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=not schnell,
                                             axes_dims_rope=(4, 6, 6))
        vae = flux_vae(tiny=True, sample_size=native_px)
    name = TINY_FLUX_SCHNELL_RANDOM if schnell else TINY_FLUX_RANDOM
    return Flux(tokenizer, text_encoder.eval(), tokenizer_2, text_encoder_2.eval(), transformer.eval(), vae.eval(),
                LoadedState(model_id=name, scheduler_config=flux_scheduler_config(schnell), few_step_model=schnell))


def build_flux_random(seed: int = 0, text_encoder: bool = False) -> Flux:
    """FLUX.1-dev's full width (3072: 24 heads of 128, T5's 4096, CLIP's pooled 768) with FLUX_RANDOM_BLOCKS of
    its blocks and its full-size VAE, random weights. text_encoder: also a CLIP ViT-L-shaped encoder and a
    one-layer T5 of T5-XXL's width over the built-in tokenizers, so `--model flux-random` renders scenes."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from .random_text import FULL_VOCAB, clip_config, tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizers, encoders = (None, None), (None, None)
        if text_encoder:
            tokenizers = (tiny_tokenizer(), t5_tokenizer())
            encoders = (CLIPTextModel(clip_config(tokenizers[0], FULL_VOCAB, 768, 3072, 12, 12)).eval(),
                        T5EncoderModel(T5Config(vocab_size=len(tokenizers[1]), d_model=4096, d_kv=64, d_ff=10240,
                                                num_layers=1, num_heads=64, feed_forward_proj="gated-gelu",
                                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval())
        transformer = FluxTransformer2DModel(num_layers=FLUX_RANDOM_BLOCKS[0], num_single_layers=FLUX_RANDOM_BLOCKS[1],
                                             guidance_embeds=True)
        vae = flux_vae(tiny=False, sample_size=1024)
    return Flux(tokenizers[0], encoders[0], tokenizers[1], encoders[1], transformer.eval(), vae.eval(),
                LoadedState(model_id=FLUX_RANDOM, scheduler_config=flux_scheduler_config()))


def sd3_scheduler_config() -> dict[str, Any]:
    """The scheduler config SD3.5 ships: flow matching with a static shift of 3."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def build_tiny_sd3_random(seed: int = 0, native_px: int = 256, t5: bool = True):
    """SD3.5-shaped components with small random weights (tests, `--model tiny-sd3-random`): two CLIP
    encoders with projections (16 wide: side by side they fill T5's 32), T5, a two-layer
    SD3Transformer2DModel patchifying 2x2 cells, the 16-channel VAE with SD3's factors."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..catalog import TINY_SD3_RANDOM
    from .random_text import clip_config, tiny_tokenizer
    from .sd3 import SD3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2, tokenizer_3 = tiny_tokenizer(), tiny_tokenizer(), t5_tokenizer()
        clip = dict(hidden=16, intermediate=32, layers=2, heads=2)
        text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, len(tokenizer), **clip))
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, len(tokenizer_2), **clip))
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0,
                                                 eos_token_id=1, decoder_start_token_id=0)) if t5 else None
        transformer = SD3Transformer2DModel(sample_size=native_px // 8, patch_size=2, in_channels=16, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                            caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
                                            pos_embed_max_size=native_px // 8)
        vae = flux_vae(tiny=True, sample_size=native_px)
        vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    return SD3(tokenizer, text_encoder.eval(), tokenizer_2, text_encoder_2.eval(), tokenizer_3 if t5 else None,
               None if text_encoder_3 is None else text_encoder_3.eval(), transformer.eval(), vae.eval(),
               LoadedState(model_id=TINY_SD3_RANDOM, scheduler_config=sd3_scheduler_config()))


def build_sd3_random(seed: int = 0, text_encoder: bool = False):
    """SD3.5-medium's transformer shape (24 layers of 24 heads of 64, 1536 wide; 2.5 B parameters) and its
    full-size VAE with random weights: the real model's compute. text_encoder: also CLIP ViT-L- and
    bigG-shaped encoders and a one-layer T5 of T5-XXL's width, so `--model sd3-random` renders scenes."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..catalog import SD3_RANDOM
    from .random_text import FULL_VOCAB, clip_config, tiny_tokenizer
    from .sd3 import SD3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizers, encoders = (None, None, None), (None, None, None)
        if text_encoder:
            tokenizers = (tiny_tokenizer(), tiny_tokenizer(), t5_tokenizer())
            encoders = (CLIPTextModelWithProjection(clip_config(tokenizers[0], FULL_VOCAB, 768, 3072, 12, 12)).eval(),
                        CLIPTextModelWithProjection(clip_config(tokenizers[1], FULL_VOCAB, 1280, 5120, 32, 20)).eval(),
                        T5EncoderModel(T5Config(vocab_size=len(tokenizers[2]), d_model=4096, d_kv=64, d_ff=10240,
                                                num_layers=1, num_heads=64, feed_forward_proj="gated-gelu",
                                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval())
        transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                            caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                            pos_embed_max_size=384, qk_norm="rms_norm",
                                            dual_attention_layers=tuple(range(13)))
        vae = flux_vae(tiny=False, sample_size=1024)
        vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    return SD3(tokenizers[0], encoders[0], tokenizers[1], encoders[1], tokenizers[2], encoders[2], transformer.eval(),
               vae.eval(), LoadedState(model_id=SD3_RANDOM, scheduler_config=sd3_scheduler_config()))


def zimage_scheduler_config() -> dict[str, Any]:
    """The scheduler config Z-Image-Turbo ships: flow matching with a static shift of 3."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": False}


def qwen3_encoder(tokenizer, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int):
    """A Qwen3 text encoder (the decoder stack without its LM head, as Z-Image and FLUX.2 klein use it)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return Qwen3Model(config).eval()


def build_tiny_zimage_random(seed: int = 0, native_px: int = 256, turbo: bool = False):
    """Z-Image-shaped components with small random weights (tests, `--model tiny-zimage-random`): a two-layer
    Qwen3 over a Qwen2 BPE tokenizer with Qwen3's chat template, a ZImageTransformer2DModel of 2 layers (and
    one of each refiner), 32 wide, patchifying 2x2 cells, the 16-channel VAE with FLUX.1's factors.
    turbo: `tiny-zimage-turbo-random`, a few-step model as Z-Image-Turbo is (9 steps, no guidance by default);
    else the base model's stand-in (50 steps, guidance 4), the same weights."""
    from diffusers import ZImageTransformer2DModel

    from ..catalog import TINY_ZIMAGE_RANDOM, TINY_ZIMAGE_TURBO_RANDOM
    from .random_text import qwen_tokenizer
    from .zimage import ZImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = qwen_tokenizer()
        text_encoder = qwen3_encoder(tokenizer, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, head_dim=8)
        transformer = ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                                               n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 4, 4],
                                               axes_lens=[1024, 256, 256])
        vae = flux_vae(tiny=True, sample_size=native_px)
    return ZImage(tokenizer, text_encoder, transformer.eval(), vae.eval(),
                  LoadedState(model_id=TINY_ZIMAGE_TURBO_RANDOM if turbo else TINY_ZIMAGE_RANDOM,
                              scheduler_config=zimage_scheduler_config(), few_step_model=turbo))


def build_zimage_random(seed: int = 0, text_encoder: bool = False):
    """Z-Image's transformer width (3840: 30 heads of 128, Qwen3-4B's 2560-wide captions) with
    ZIMAGE_RANDOM_LAYERS of its 30 main layers and its refiners, and the full-size VAE: a step's cost per
    layer as the real model's. text_encoder: also a one-layer Qwen3 of Qwen3-4B's width, so `--model
    zimage-random` renders scenes."""
    from diffusers import ZImageTransformer2DModel

    from ..catalog import ZIMAGE_RANDOM, ZIMAGE_RANDOM_LAYERS
    from .random_text import qwen_tokenizer
    from .zimage import ZImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = encoder = None
        if text_encoder:
            tokenizer = qwen_tokenizer()
            encoder = qwen3_encoder(tokenizer, hidden=2560, intermediate=9728, layers=2, heads=32, kv_heads=8,
                                    head_dim=128)
        transformer = ZImageTransformer2DModel(in_channels=16, dim=3840, n_layers=ZIMAGE_RANDOM_LAYERS,
                                               n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560)
        vae = flux_vae(tiny=False, sample_size=1024)
    return ZImage(tokenizer, encoder, transformer.eval(), vae.eval(),
                  LoadedState(model_id=ZIMAGE_RANDOM, scheduler_config=zimage_scheduler_config()))


def klein_scheduler_config() -> dict[str, Any]:
    """The scheduler config FLUX.2 klein ships: flow matching, its shift dynamic (the pipeline's empirical mu)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096, "time_shift_type": "exponential"}


def klein_vae(tiny: bool, sample_size: int, seed_generator: torch.Generator):
    """AutoencoderKLFlux2 (32 latent channels) with batch-norm running statistics that are not the identity, so
    the patch normalisation is exercised: each of the 128 patch channels its own mean and variance."""
    from diffusers import AutoencoderKLFlux2

    shape = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4} if tiny else {}
    vae = AutoencoderKLFlux2(latent_channels=32, sample_size=sample_size, **shape)
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(torch.randn(channels, generator=seed_generator) * 0.2)
    vae.bn.running_var.copy_(torch.rand(channels, generator=seed_generator) + 0.5)
    return vae.eval()


def qwen3_causal(tokenizer, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int):
    """A Qwen3ForCausalLM (FLUX.2 klein's text encoder class; only its hidden states are read)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).eval()


def build_tiny_klein_random(seed: int = 0, native_px: int = 256, distilled: bool = True):
    """FLUX.2-klein-shaped components with small random weights (tests, `--model tiny-flux2-klein-random`): a
    28-layer Qwen3 16 wide (klein reads layers 9, 18 and 27), a Flux2Transformer2DModel of one double and one
    single block over 128-channel patch tokens, the 32-channel VAE with non-trivial batch-norm statistics.
    distilled: as FLUX.2-klein-4B (4 steps, no guidance); else `tiny-flux2-klein-base-random` (CFG, 50 steps)."""
    from diffusers import Flux2Transformer2DModel

    from ..catalog import TINY_KLEIN_BASE_RANDOM, TINY_KLEIN_RANDOM
    from .flux2 import Flux2Klein
    from .random_text import qwen_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = qwen_tokenizer()
        text_encoder = qwen3_causal(tokenizer, hidden=16, intermediate=32, layers=28, heads=2, kv_heads=1, head_dim=8)
        transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                              axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = klein_vae(True, native_px, torch.Generator().manual_seed(seed))
    name = TINY_KLEIN_RANDOM if distilled else TINY_KLEIN_BASE_RANDOM
    return Flux2Klein(tokenizer, text_encoder, transformer.eval(), vae,
                      LoadedState(model_id=name, scheduler_config=klein_scheduler_config(), few_step_model=distilled))


def build_klein_random(seed: int = 0, text_encoder: bool = False):
    """FLUX.2 klein 4B's transformer width (24 heads of 128, 7680-wide text: three of Qwen3-4B's 2560-wide layers)
    with KLEIN_RANDOM_BLOCKS of its (5, 20) blocks and the full-size VAE. text_encoder: also a 28-layer Qwen3 of
    Qwen3-4B's width (its MLPs narrowed), so `--model flux2-klein-random` renders scenes."""
    from diffusers import Flux2Transformer2DModel

    from ..catalog import KLEIN_RANDOM, KLEIN_RANDOM_BLOCKS
    from .flux2 import Flux2Klein
    from .random_text import qwen_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = encoder = None
        if text_encoder:
            tokenizer = qwen_tokenizer()
            encoder = qwen3_causal(tokenizer, hidden=2560, intermediate=256, layers=28, heads=32, kv_heads=8,
                                   head_dim=128)
        transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=KLEIN_RANDOM_BLOCKS[0],
                                              num_single_layers=KLEIN_RANDOM_BLOCKS[1], attention_head_dim=128,
                                              num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)
        vae = klein_vae(False, 1024, torch.Generator().manual_seed(seed))
    return Flux2Klein(tokenizer, encoder, transformer.eval(), vae,
                      LoadedState(model_id=KLEIN_RANDOM, scheduler_config=klein_scheduler_config(), few_step_model=True))
