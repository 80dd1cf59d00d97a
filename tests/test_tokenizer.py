"""tiny-random's tokenizer counts tokens like SD2's CLIP BPE (so its truncation warnings are true), round trips
through a saved folder, and prompts longer than the text encoder's window are named in a warning."""
from __future__ import annotations

import pytest

from multidiff_cli.models.names import CLIP_CONTRACTIONS, TOKENIZER_WORDS
from multidiff_cli.models.random_text import tiny_tokenizer
from multidiff_cli.run.render import render
from multidiff_cli.scene import load_scene


VAN_GOGH_SKY = "the sky over a town, painted in the style of Van Gogh's Starry Night, swirling brush strokes"


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def test_every_listed_word_and_contraction_is_one_token(tiny):
    for word in TOKENIZER_WORDS + CLIP_CONTRACTIONS:
        assert token_count(tiny.tokenizer, word) == 1, word
        assert token_count(tiny.tokenizer, word.upper()) == 1, word  # CLIP lowercases first


def test_a_prompt_costs_one_token_per_listed_word_and_per_punctuation_mark(tiny):
    # 17 words, 2 commas, 's: the byte-level tokenizer made 78 tokens of this and warned
    assert token_count(tiny.tokenizer, VAN_GOGH_SKY) == 17 + 2 + 1


def test_a_100_word_prompt_warns_with_both_counts(tiny):
    words = " ".join(TOKENIZER_WORDS[i * 7 % len(TOKENIZER_WORDS)] for i in range(100))
    (note,) = tiny.truncation_warnings([("regions[2].prompt", words)])
    assert note.startswith("regions[2].prompt is 100 tokens, over the text encoder's 75 (77 with the start and end "
                           "tokens): cut after '...")
    assert "\n" not in note


def test_unlisted_words_still_encode_in_pieces(tiny):
    assert token_count(tiny.tokenizer, "harbours") in (2, 3, 4)  # "harbour" is listed, the plural is not
    assert token_count(tiny.tokenizer, "zxqv") == 4
    assert token_count(tiny.tokenizer, "café ☕") >= 3  # byte-level: any text encodes, nothing is unknown
    assert tiny.tokenizer.unk_token_id not in tiny.tokenizer("café ☕ zxqv", add_special_tokens=False).input_ids


@pytest.mark.parametrize("one, other", [
    ("a red velvet sofa", "a blue velvet sofa"),
    ("a red velvet sofa", "a velvet red sofa"),
    ("a zxqv", "a zxqw"),  # unlisted words too
    ("a photo", "a photo,"),
])
def test_different_prompts_give_different_ids(tiny, one, other):
    assert tiny.tokenizer(one).input_ids != tiny.tokenizer(other).input_ids


def test_the_tokenizer_is_built_the_same_every_time():
    first, second = tiny_tokenizer(), tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_the_text_encoder_has_one_embedding_per_token(tiny):
    assert tiny.text_encoder.config.vocab_size == len(tiny.tokenizer)
    assert len(tiny_tokenizer()) <= 49408  # sd2-random's text encoder has SD2's 49408 embeddings


def test_the_tokenizer_round_trips_through_a_folder(tiny, tiny_folder):
    from transformers import CLIPTokenizer

    loaded = CLIPTokenizer.from_pretrained(tiny_folder, subfolder="tokenizer")
    assert len(loaded) == len(tiny.tokenizer)
    texts = [VAN_GOGH_SKY, "harbours, zxqv; café ☕!", "a 360 degree panorama", " ".join(TOKENIZER_WORDS)]
    for text in texts:
        assert loaded(text).input_ids == tiny.tokenizer(text).input_ids, text
    padded = loaded([VAN_GOGH_SKY], padding="max_length", max_length=77, truncation=True).input_ids
    assert padded == tiny.tokenizer([VAN_GOGH_SKY], padding="max_length", max_length=77, truncation=True).input_ids


def test_a_prompt_over_77_tokens_is_named_in_a_warning(tiny, write_scene):
    long = " ".join(["red"] * 100)  # 100 tokens or more, however the tokenizer splits it
    scene = load_scene(write_scene(f"prompt: {long}\nwidth: 64\nheight: 64\nsteps: 1\n"))
    result = render(scene, tiny, seed=0)
    assert len(result.warnings) == 1 and result.warnings[0].startswith("prompt is ")
    assert "cut after" in result.warnings[0]
