"""tests/test_score.py: the exact scorer on hand-written captions (hand-computed), ground truth (100) and fuzzing."""
import math

import numpy as np
import pytest

from data.score import METRICS, normalise, score_caption, score_captions
from data.shapes import VOCAB, WorldConfig, make_caption, sample

# Red large circle top-left, blue small square at the right, yellow large star at the bottom.
SCENE = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "row": 0, "col": 0},
                     {"shape": "square", "colour": "blue", "size": "small", "row": 1, "col": 2},
                     {"shape": "star", "colour": "yellow", "size": "large", "row": 2, "col": 1}]}
CIRCLE = "there is a large red circle at the top-left ."
SQUARE = "a small blue square is at the right ."


def check(text: str, **expected: float) -> dict:
    got = score_caption(text, SCENE)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), (name, got)
    return got


def test_true_caption_scores_exactly():
    check(f"{CIRCLE} {SQUARE} the bottom has a large yellow star . there are three objects . "
          "the red circle is above the yellow star .",
          headline=100, factuality=1, coverage=1, syntax=1, repetition=0,
          n_sentences=5, n_claims=5, n_true=5, n_unparsed=0)


def test_every_template_form_parses():
    for text in ["at the top-left , there is a large red circle .", "the right has a small blue square .",
                 "we can see a large yellow star at the bottom .", "there are three shapes .",
                 "the image shows three objects .", "the image shows three shapes .",
                 "the blue square is right of the red circle .", "the red circle is left of the blue square .",
                 "the yellow star is below the red circle ."]:
        check(text, syntax=1, factuality=1, n_claims=1)


def test_false_attribute_halves_factuality():
    # 1 true claim of 2; coverage 1/3; harmonic mean of 1/2 and 1/3 is 2/5.
    check(f"there is a large green circle at the top-left . {SQUARE}",
          factuality=0.5, coverage=1 / 3, syntax=1, headline=40, n_claims=2, n_true=1)


def test_false_count_position_and_relation():
    check("there are two objects .", factuality=0, syntax=1, headline=0)
    check("there is a large red circle at the center .", factuality=0, coverage=0)
    check("the red circle is below the yellow star .", factuality=0, syntax=1)
    check("the green cross is left of the red circle .", factuality=0, syntax=1)


def test_garbled_sentence_counts_as_unparsed_and_false():
    check(f"{CIRCLE} circle the blue is square .",
          factuality=0.5, syntax=0.5, coverage=1 / 3, headline=40, n_unparsed=1, n_claims=1)
    # Grammar is exact: number agreement, and no partial credit for an extra word.
    for text in ["there are one objects .", "there is two objects .", f"{CIRCLE[:-2]} left .", "a circle ."]:
        check(text, syntax=0, factuality=0, n_unparsed=1)


def test_repeated_sentence_and_repeated_claim():
    # 2 true claims of 2, coverage 1/3 -> harmonic mean 1/2; half the sentences repeat -> 100 * 0.5 * 0.5.
    check(f"{CIRCLE} {CIRCLE}", factuality=1, repetition=0.5, headline=25)
    check(f"{CIRCLE} the top-left has a large red circle .", factuality=1, repetition=0.5, headline=25)
    check("the red circle is left of the blue square . the blue square is right of the red circle .", repetition=0.5)
    check("there are three objects . the image shows three shapes .", repetition=0.5)
    check("blah blah . blah blah .", repetition=0.5, n_unparsed=2)


def test_normalisation_case_punctuation_and_trailing_fragment():
    assert normalise("A Circle.  Star,top") == ["a", "circle", ".", "star", ",", "top"]
    check("There is a LARGE red circle at the top-left.A small blue square is at the right",
          factuality=1, n_sentences=2, n_claims=2, coverage=2 / 3)
    check("\n\n there is a large red circle at the top-left . . . .", n_sentences=1, factuality=1)


@pytest.mark.parametrize("text", ["", "   ", ".", "... . .", "\n\t \r"])
def test_empty_and_punctuation_only(text):
    check(text, headline=0, factuality=0, coverage=0, syntax=0, repetition=0, n_sentences=0)


def test_ground_truth_captions_score_100_on_every_split():
    cfg = WorldConfig()
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        texts, scenes = [], []
        for i in range(200):
            s = sample(split, i, cfg)
            texts += [s["caption"], make_caption(s["scene"], rng, cfg)]
            scenes += [s["scene"]] * 2
        means = score_captions(texts, scenes)
        assert means["n_captions"] == 400
        assert (means["headline"], means["factuality"], means["coverage"], means["syntax"], means["repetition"]) \
            == (100, 1, 1, 1, 0)


def _in_range(result: dict) -> bool:
    return (set(result) == set(METRICS) and 0 <= result["headline"] <= 100
            and all(0 <= result[m] <= 1 for m in ("factuality", "coverage", "syntax", "repetition"))
            and all(isinstance(result[m], int) and result[m] >= 0 for m in METRICS[5:])
            and not any(math.isnan(v) for v in result.values()))


def test_fuzz_never_raises_and_stays_in_range():
    rng = np.random.default_rng(0)
    pieces = VOCAB + [".", ",", "circle.", "Top,", "!!", "ünïcödé", "日本", "\u200b", "\n", "", "..", "e\u0301"]
    for trial in range(300):
        kind = trial % 3
        if kind == 0:  # word salad from the vocabulary and friends
            text = " ".join(pieces[k] for k in rng.integers(len(pieces), size=rng.integers(0, 80)))
        elif kind == 1:  # random bytes decoded as garbage
            text = bytes(rng.integers(0, 256, size=rng.integers(0, 300)).astype(np.uint8)).decode("utf-8", "replace")
        else:  # random code points, including surrogates and control characters
            text = "".join(chr(c) for c in rng.integers(0, 0x110000, size=rng.integers(0, 100)))
        assert _in_range(score_caption(text, SCENE)), text
    assert _in_range(score_caption("star " * 100_000 + "." * 1000, SCENE))
    assert _in_range(score_caption(b"\xff\xfe there is one object .", SCENE))  # bytes are tolerated too
    assert score_captions([], [])["headline"] == 0

