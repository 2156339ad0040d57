"""data/tokenizer.py: text <-> token ids: words (the shapes world), CLIP's BPE (real captions).

Both share one small interface:

    encode(text, stats=None) -> list[int]   unknown words -> unk_id, counted in stats["unknown"]
    decode(ids, skip_special=True) -> str   words joined by single spaces (the text convention)
    pad_id, mask_id, eos_id (== eot_id), unk_id, image_id, vocab_size, special_ids, ordinary_ids
    to_dict() -> JSON-able dict             saved in checkpoints; tokenizer_from_dict(d) rebuilds it

Text convention: lowercase words and punctuation separated by single spaces ("there is a red
circle ."). encode normalises user text ("There is a red circle.") the same way, and never produces
a special id, whatever the text says: "<mask>" typed by a user is an unknown word, not the mask.
"""
from __future__ import annotations

import re

from data.shapes import VOCAB

SPECIALS = ["<pad>", "<mask>", "<eos>", "<unk>", "<image>"]  # numbered in this order by all
PUNCTUATION = ",.!?;:"  # split off their words: "circle." -> "circle", "."
_WORD_OR_MARK = re.compile(f"[{re.escape(PUNCTUATION)}]|[^\\s{re.escape(PUNCTUATION)}]+")


def split_words(text: str) -> list[str]:
    """Lowercase `text` and split it into words, punctuation marks being words of their own."""
    return _WORD_OR_MARK.findall(text.lower())


class Tokenizer:
    """The shared part: named special ids; a subclass numbers SPECIALS from `first_special` on."""

    def _set_specials(self, first_special: int, vocab_size: int, reserved: tuple = ()) -> None:
        """`reserved`: more ids that encode never produces (they count as special: banned in
        generation, never drawn as random replacements, skipped by decode)."""
        specials = range(first_special, first_special + len(SPECIALS))
        self.pad_id, self.mask_id, self.eos_id, self.unk_id, self.image_id = specials
        self.eot_id = self.eos_id  # end of text is also end of turn: one caption is one turn
        self.vocab_size = vocab_size
        self.special_ids = list(specials) + list(reserved)
        self.ordinary_ids = sorted(set(range(vocab_size)) - set(self.special_ids))

    def _counted(self, ids: list[int], stats: dict | None) -> list[int]:
        """ids, their unknown words added to stats["unknown"] (when stats is given)."""
        if stats is not None:
            stats["unknown"] = stats.get("unknown", 0) + ids.count(self.unk_id)
        return ids

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids


class WordTokenizer(Tokenizer):
    """One word (or punctuation mark) = one token: SPECIALS are ids 0..4, then `words` in order."""

    def __init__(self, words):
        words = list(words)
        bad = [w for w in words if not isinstance(w, str) or split_words(w) != [w] or w in SPECIALS]
        if bad:
            raise ValueError(f"word {bad[0]!r} cannot be a vocabulary entry: entries must be "
                             "lowercase, contain no whitespace, be one punctuation mark or contain "
                             f"none of {PUNCTUATION!r}, and not be a special token {SPECIALS}")
        repeated = sorted({w for w in words if words.count(w) > 1})
        if repeated:
            raise ValueError(f"duplicate words in the vocabulary: {repeated}")
        self.words = SPECIALS + words  # id -> word; self.index: word -> id, without the specials
        self.index = {w: i for i, w in enumerate(words, start=len(SPECIALS))}
        self._set_specials(0, len(self.words))

    @classmethod
    def for_shapes_world(cls) -> WordTokenizer:
        """The shapes world's vocabulary and the prompt's words, in the order checkpoints use."""
        return cls(sorted(set(VOCAB) | {"describe", "image"}))

    def encode(self, text: str, stats: dict | None = None) -> list[int]:
        ids = [self.index.get(word, self.unk_id) for word in split_words(text)]
        return self._counted(ids, stats)

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = self._check_ids(ids)
        return " ".join(self.words[i] for i in ids if not (skip_special and i < len(SPECIALS)))

    def to_dict(self) -> dict:
        return {"kind": "word", "words": self.words[len(SPECIALS):]}


_HYPHEN = re.compile(r"(\w) - (?=\w)")


class ClipBpeTokenizer(Tokenizer):
    """open_clip's bundled CLIP BPE (49,408 ids, in the wheel, works offline), then SPECIALS.

    CLIP's own start/end-of-text markers are never produced by encode and count as special ids.
    The BPE forgets where the spaces were, so decode separates every word and punctuation mark by
    one space: decode(encode("A dog, running.")) == "a dog , running ." (the text convention); a
    hyphen between two words stays attached ("top-left"), as the shapes world spells positions."""

    def __init__(self):
        from open_clip.tokenizer import SimpleTokenizer  # here: open_clip loads slowly
        bpe = self.bpe = SimpleTokenizer()
        clip_markers = (bpe.sot_token_id, bpe.eot_token_id)
        # Text that spells a marker ("<end_of_text>") would make open_clip emit its id: split it.
        spelled = "|".join(re.escape(bpe.decoder[i]) for i in clip_markers)
        self._marker_text = re.compile(spelled, re.IGNORECASE)
        self._set_specials(bpe.vocab_size, bpe.vocab_size + len(SPECIALS), reserved=clip_markers)

    def encode(self, text: str, stats: dict | None = None) -> list[int]:
        """BPE ids without open_clip's start/end tokens (byte-level BPE knows every string)."""
        ids, start = [], 0
        for marker in self._marker_text.finditer(text):
            ids += self.bpe.encode(text[start:marker.start()]) + self.bpe.encode(marker.group()[0])
            ids += self.bpe.encode(marker.group()[1:])  # a marker's "<" on its own, then the rest
            start = marker.end()
        return self._counted(ids + self.bpe.encode(text[start:]), stats)

    def decode(self, ids, skip_special: bool = True) -> str:
        ids, special = self._check_ids(ids), set(self.special_ids)
        pieces, run = [], []  # runs of BPE ids decode together (a word may span several ids)
        for i in ids:
            if i < self.bpe.vocab_size and i not in special:
                run.append(i)
                continue
            pieces.append(self.bpe.decode(run))
            run = []
            if not skip_special:
                name = SPECIALS[i - self.pad_id] if i >= self.pad_id else self.bpe.decoder[i]
                pieces.append(f" {name} ")
        pieces.append(self.bpe.decode(run))
        return _HYPHEN.sub(r"\1-", " ".join("".join(pieces).split()))

    def to_dict(self) -> dict:
        return {"kind": "clip_bpe"}


def tokenizer_from_dict(d) -> Tokenizer:
    """Rebuild a tokenizer from its to_dict() (e.g. from a checkpoint's metadata)."""
    if not isinstance(d, dict):
        raise ValueError(f"a tokenizer description must be a dict, got {type(d).__name__}")
    kind = d.get("kind")
    if kind == "word":
        words = d.get("words")
        try:
            if not isinstance(words, list):
                raise ValueError(f"a list of strings is needed, got {words!r:.80}")
            return WordTokenizer(words)
        except ValueError as e:
            raise ValueError(f"tokenizer field 'words' is invalid: {e}") from None
    if kind == "clip_bpe":
        return ClipBpeTokenizer()
    raise ValueError(f"tokenizer field 'kind' is {kind!r}; expected 'word' or 'clip_bpe'")
