"""Text parts of the random models, built in code (no download): the tiny CLIP BPE tokenizer every
random model shares, and CLIP text encoder configs over it."""
from __future__ import annotations

from collections import Counter

from .names import CLIP_CONTRACTIONS, TOKENIZER_WORDS

TINY_TEXT = dict(hidden=32, intermediate=64, layers=2, heads=4)  # the tiny CLIP text encoders' shape
FULL_VOCAB = 49408  # CLIP's vocabulary: the full-size encoders' embedding tables (the tokenizer is tiny-random's)


def clip_config(tokenizer, vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int):
    """A CLIP text encoder's config over `tokenizer`'s special tokens, projection as wide as its hidden states."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_tokenizer():
    """A CLIP BPE tokenizer built in code: one token for each of ~1500 common English words
    (names.TOKENIZER_WORDS), pieces for any other word, one token per punctuation mark, so a prompt
    costs about as many tokens as in SD2's own 49408-token CLIP tokenizer (a byte-level tokenizer
    without merges made 78 tokens of a 17-word prompt and warned of truncation).

    The vocabulary is byte-level (every text encodes), plus every ending and beginning of a listed
    word. The merges, lowest rank first (BPE merges the lowest-ranked adjacent pair, repeatedly):
    1. endings, built right to left: (c, rest</w>) for every ending c+rest of a listed word. Only
       a word's last symbol ends in </w>, so only the pair at the word's end can be one of these,
       and for a listed word it always is until the word is one token, whatever else the table holds.
    2. beginnings, built left to right, longest first: pieces for the rest of an unlisted word
       ("harb" + "ours</w>"). Ranked after every ending, so they never interrupt step 1.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in bytes_to_unicode():
            vocab[char + suffix] = len(vocab)
    words = TOKENIZER_WORDS + CLIP_CONTRACTIONS
    endings = {(w[i], w[i + 1:] + "</w>"): w[i:] + "</w>" for w in words for i in range(len(w) - 1)}
    beginnings = {(w[:i - 1], w[i - 1]): w[:i] for w in words for i in range(2, len(w))}
    starts = Counter(w[:2] for w in words)  # among beginnings of one length, the commonest word starts first
    merges = sorted(endings, key=lambda pair: (len(endings[pair]), endings[pair])) + sorted(
        beginnings, key=lambda pair: (-len(beginnings[pair]), -starts[beginnings[pair][:2]], beginnings[pair])
    )
    for pair in merges:
        vocab.setdefault(endings.get(pair) or beginnings[pair], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)


def bytes_to_unicode() -> list[str]:
    """The printable stand-ins byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


# Qwen3's chat template, as much of it as a prompt's single user turn uses (ZImagePipeline and Flux2KleinPipeline
# format every prompt so): turns between <|im_start|> and <|im_end|>, the assistant's turn opened, and an empty
# think block when thinking is turned off.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer built in code, with Qwen3's chat template: the 256 byte symbols,
    then for each listed word (names.TOKENIZER_WORDS) after a space ("Ġ") the merges that build it left
    to right, shorter pieces first, so a listed word is one token and any other text still encodes."""
    from transformers import Qwen2Tokenizer

    chars = bytes_to_unicode()
    vocab = {char: i for i, char in enumerate(chars)}
    space = chars[ord(" ")]
    pieces = {}
    for word in TOKENIZER_WORDS:  # after a space only: chains of bare words would cut into these
        text = space + word
        for i in range(2, len(text) + 1):
            pieces.setdefault((text[: i - 1], text[i - 1]), text[:i])
    merges = sorted(pieces, key=lambda pair: (len(pieces[pair]), pieces[pair]))
    for pair in merges:
        vocab.setdefault(pieces[pair], len(vocab))
    for special in QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges,
                               additional_special_tokens=list(QWEN_SPECIALS[1:]))
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer
