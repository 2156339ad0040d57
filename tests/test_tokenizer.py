"""tests/test_tokenizer.py: word and CLIP-BPE tokenizers: round trips, unknown words, specials, save and rebuild."""
import json
import random

import numpy as np
import pytest
import torch

from data import shapes
from data.pipeline import PROMPT
from data.tokenizer import (SPECIALS, ClipBpeTokenizer, WordTokenizer, split_words,
                            tokenizer_from_dict)

N_CAPTIONS = 300


@pytest.fixture(scope="module")
def word():
    return WordTokenizer.for_shapes_world()


@pytest.fixture(scope="module")
def clip():
    return ClipBpeTokenizer()  # the first one imports open_clip (and torch): a few seconds


@pytest.fixture(scope="module")
def captions():
    """Ground-truth captions, other true captions of the same scenes, and their hallucinated copies."""
    out = []
    for i in range(N_CAPTIONS):
        s = shapes.sample("train", i)
        rng = np.random.default_rng(i)
        other = shapes.make_caption(s["scene"], rng, shapes.WorldConfig())
        pair = shapes.hallucination_pair(s["scene"], other, rng)
        out += [s["caption"], other] + ([pair["wrong"]] if pair else [])
    return out


def check_interface(tok):
    """The attributes every tokenizer has, and how they relate."""
    names = [tok.pad_id, tok.mask_id, tok.eos_id, tok.unk_id, tok.image_id]
    assert len(set(names)) == len(SPECIALS) and tok.eot_id == tok.eos_id
    assert set(names) <= set(tok.special_ids)
    assert not set(tok.special_ids) & set(tok.ordinary_ids)
    assert sorted(tok.special_ids + tok.ordinary_ids) == list(range(tok.vocab_size))
    for name, i in zip(SPECIALS, names):
        assert tok.decode([i], skip_special=False) == name and tok.decode([i]) == ""


# ----------------------------------------------------------------------------------------------------------------
# WordTokenizer


def test_shapes_vocabulary_is_fixed_and_specials_come_first(word):
    assert word.words == SPECIALS + sorted(set(shapes.VOCAB) | {"describe", "image"})
    assert (word.pad_id, word.mask_id, word.eos_id, word.unk_id, word.image_id) == (0, 1, 2, 3, 4)
    assert word.vocab_size == len(word.words) and word.special_ids == [0, 1, 2, 3, 4]
    check_interface(word)


def test_word_round_trip_on_generated_captions(word, captions):
    stats = {}
    for caption in captions:
        ids = word.encode(caption, stats)
        assert len(ids) == len(caption.split())  # one word, one token
        assert not set(ids) & set(word.special_ids)
        assert word.decode(ids) == caption
    assert stats["unknown"] == 0
    assert word.encode(PROMPT) and word.unk_id not in word.encode(PROMPT)


def test_unknown_words_map_to_unk_and_are_counted(word):
    stats = {"unknown": 2}
    ids = word.encode("there is a pink circle near the dog", stats)
    assert ids.count(word.unk_id) == 3 and stats["unknown"] == 5
    assert word.decode(ids) == "there is a circle the"  # unknown is special: skipped
    assert word.decode(ids, skip_special=False) == "there is a <unk> circle <unk> the <unk>"
    assert word.encode("there is a circle", None) == word.encode("there is a circle")


def test_user_text_is_lowercased_and_punctuation_split(word):
    assert word.encode("There is a red circle.") == word.encode("there is a red circle .")
    assert word.decode(word.encode("At the TOP-left,a small red circle.There are two objects."))\
        == "at the top-left , a small red circle . there are two objects ."
    assert split_words(" circle.\n\t, star!? ") == ["circle", ".", ",", "star", "!", "?"]
    assert word.encode("") == [] and word.encode("  \n ") == []


def test_text_spelling_a_special_token_is_just_unknown(word):
    stats = {}
    ids = word.encode(" ".join(SPECIALS) + " <mask>red", stats)
    assert ids == [word.unk_id] * (len(SPECIALS) + 1) and stats["unknown"] == len(SPECIALS) + 1


def test_random_text_never_yields_a_special_other_than_unk(word):
    rng = random.Random(0)
    pieces = list(word.words) + list(",.!?;:") + ["\n", "  ", "é", "Circle", "<", ">", "42"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randrange(30)))
        ids = word.encode(text)
        assert len(ids) == len(split_words(text))
        assert all(0 <= i < word.vocab_size for i in ids)
        assert not set(ids) & (set(word.special_ids) - {word.unk_id})


def test_decode_accepts_tensors_and_rejects_ids_outside_the_vocabulary(word):
    ids = word.encode("a red star .")
    assert word.decode(torch.tensor(ids)) == "a red star ."
    assert word.decode([word.mask_id] + ids + [word.eos_id, word.pad_id]) == "a red star ."
    with pytest.raises(ValueError, match="outside the vocabulary"):
        word.decode([word.vocab_size])


@pytest.mark.parametrize("words, match", [(["red", "red"], "duplicate.*red"), (["<mask>"], "'<mask>'"),
                                          (["Red"], "'Red'"), (["two words"], "'two words'"),
                                          (["circle."], "'circle.'"), ([7], "word 7")])
def test_bad_vocabularies_are_refused(words, match):
    with pytest.raises(ValueError, match=match):
        WordTokenizer(words)


def test_word_tokenizer_saves_and_rebuilds(word, captions):
    saved = json.loads(json.dumps(word.to_dict()))  # through JSON, as in a checkpoint
    assert saved["kind"] == "word"
    rebuilt = tokenizer_from_dict(saved)
    assert rebuilt.words == word.words and rebuilt.special_ids == word.special_ids
    assert all(rebuilt.encode(c) == word.encode(c) for c in captions[:50])
    custom = WordTokenizer(["zebra", "a", "."])
    assert tokenizer_from_dict(custom.to_dict()).encode("a zebra.") == [6, 5, 7]


@pytest.mark.parametrize("d, field", [
    (None, "dict"), (["word"], "dict"), ({}, "'kind'"), ({"kind": "bpe"}, "'kind'"),
    ({"kind": "word"}, "'words'"), ({"kind": "word", "words": "a b"}, "'words'"),
    ({"kind": "word", "words": ["a", 3]}, "'words'"), ({"kind": "word", "words": ["a", "a"]}, "'words'"),
    ({"kind": "word", "words": ["<pad>"]}, "'words'")])
def test_malformed_tokenizer_dicts_name_the_bad_field(d, field):
    with pytest.raises(ValueError, match=field):
        tokenizer_from_dict(d)


# ----------------------------------------------------------------------------------------------------------------
# ClipBpeTokenizer


def test_clip_specials_follow_the_bpe_vocabulary(clip):
    n_bpe = clip.bpe.vocab_size
    assert n_bpe == 49408
    assert [clip.pad_id, clip.mask_id, clip.eos_id, clip.unk_id, clip.image_id] == list(range(n_bpe, n_bpe + 5))
    assert clip.vocab_size == n_bpe + len(SPECIALS)
    # CLIP's own start/end-of-text markers are special too: banned in generation, never random replacements.
    assert {clip.bpe.sot_token_id, clip.bpe.eot_token_id} <= set(clip.special_ids)
    check_interface(clip)


def test_clip_round_trip_on_english_and_shapes_captions(clip, captions):
    ids = clip.encode("A photo of a dog, running on the beach.")
    assert clip.decode(ids) == "a photo of a dog , running on the beach ."
    assert clip.bpe.decode(ids).split() == clip.decode(ids).split()  # its own ids, unchanged
    stats = {}
    for caption in captions[:100]:
        ids = clip.encode(caption, stats)
        assert not set(ids) & set(clip.special_ids)
        assert clip.decode(ids) == caption
    assert stats["unknown"] == 0  # byte-level BPE: nothing is unknown


def test_clip_never_emits_its_markers_or_our_specials(clip):
    text = "hi <end_of_text> there <START_OF_TEXT> <mask> <image>"
    ids = clip.encode(text)
    assert not set(ids) & set(clip.special_ids)
    assert clip.decode(ids) == "hi < end _ of _ text > there < start _ of _ text > < mask > < image >"


def test_clip_decode_skips_or_names_specials(clip):
    ids = clip.encode("a red car")
    assert clip.decode([clip.mask_id] + ids[:1] + [clip.eos_id] + ids[1:] + [clip.bpe.eot_token_id]) == "a red car"
    assert clip.decode(ids + [clip.eos_id, clip.pad_id], skip_special=False) == "a red car <eos> <pad>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        clip.decode([-1])


def test_clip_tokenizer_saves_and_rebuilds(clip):
    assert clip.to_dict() == {"kind": "clip_bpe"}
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(clip.to_dict())))
    assert isinstance(rebuilt, ClipBpeTokenizer) and rebuilt.special_ids == clip.special_ids
    assert rebuilt.encode("two cats on a sofa") == clip.encode("two cats on a sofa")
