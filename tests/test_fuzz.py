"""tests/test_fuzz.py: property tests (hypothesis) of the tokenizer, the scorer, both samplers and Stage I corruption."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rediff
from data import shapes
from data.pipeline import answer_ids
from data.score import METRICS, score_caption
from data.tokenizer import SPECIALS, WordTokenizer
from rediff import steps_for

# Small example counts keep the file near 10 s on 2 cores; every run explores new examples (and replays failures).
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORD = WordTokenizer.for_shapes_world()

# ---------------------------------------------------------------------------------------------------- strategies


@st.composite
def scenes(draw, max_objects=shapes.GRID * shapes.GRID):
    """A scene graph as make_scene writes it: objects in distinct cells (0 objects allowed: the scorer must cope)."""
    cells = draw(st.lists(st.integers(0, shapes.GRID ** 2 - 1), max_size=max_objects, unique=True))
    return {"objects": [{"shape": draw(st.sampled_from(shapes.SHAPES)), "colour": draw(st.sampled_from(shapes.COLOURS)),
                         "size": draw(st.sampled_from(shapes.SIZES)), "row": c // shapes.GRID, "col": c % shapes.GRID}
                        for c in cells]}


@st.composite
def captions(draw):
    """(scene, a true caption of it) from the world's own caption generator, with drawn optional-sentence rates."""
    scene = draw(scenes(max_objects=4).filter(lambda s: s["objects"]))
    cfg = shapes.WorldConfig(p_count=draw(st.floats(0, 1)), p_relation=draw(st.floats(0, 1)),
                             max_words=draw(st.integers(4 * shapes.LONGEST_OBJECT_SENTENCE, 120)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return scene, shapes.make_caption(scene, rng, cfg)


# Text that reaches the scorer's grammar (vocabulary words, glued punctuation, case) as well as plain garbage.
WORDISH = st.sampled_from(shapes.VOCAB + ["circle.", "Top,", "LARGE", "<mask>", "<eos>", "ünï", "", "\n", ".."])
ANY_TEXT = st.one_of(st.text(max_size=200), st.lists(WORDISH, max_size=60).map(" ".join),
                     st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")))

# ---------------------------------------------------------------------------------------------------- tokenizer


@FEW
@given(captions())
def test_word_tokenizer_round_trips_generated_captions(scene_and_caption):
    _, caption = scene_and_caption
    stats = {}
    ids = WORD.encode(caption, stats)
    assert WORD.decode(ids) == caption and stats["unknown"] == 0
    assert not set(ids) & set(WORD.special_ids), "a caption's ids are never special"
    # User-style text (capitalised, punctuation glued to words) encodes to the same ids.
    user = caption.capitalize().replace(" .", ".").replace(" ,", ",")
    assert WORD.encode(user) == ids


@FEW
@given(captions(), st.integers(2, 80))
def test_answer_ids_truncate_with_a_count_and_pad_with_eos(scene_and_caption, answer_len):
    _, caption = scene_and_caption
    stats = {}
    ids = answer_ids(WORD, caption, answer_len, stats)
    n = len(caption.split())
    assert len(ids) == answer_len and ids[-1] == WORD.eos_id, "always answer_len ids, always room for one EOS"
    assert stats.get("truncated", 0) == (n > answer_len - 1), "truncation is counted, never silent"
    kept = min(n, answer_len - 1)
    assert WORD.decode(ids[:kept]) == " ".join(caption.split()[:kept]) and set(ids[kept:]) == {WORD.eos_id}


@FEW
@given(st.lists(st.sampled_from(shapes.VOCAB + ["zebra", "<mask>", "<image>", "Ümlaut", "42"]), max_size=40))
def test_unknown_words_are_counted_and_never_special(words):
    stats = {}
    ids = WORD.encode(" ".join(words), stats)
    known = set(shapes.VOCAB)
    assert len(ids) == len(words) and stats["unknown"] == sum(w not in known for w in words)
    assert all(i == WORD.unk_id or i not in WORD.special_ids for i in ids), "typed '<mask>' is unknown, not the mask"

# ---------------------------------------------------------------------------------------------------- scorer


def in_range(r: dict) -> bool:
    return (set(r) == set(METRICS) and 0 <= r["headline"] <= 100 and not any(math.isnan(v) for v in r.values())
            and all(0 <= r[m] <= 1 for m in ("factuality", "coverage", "syntax", "repetition"))
            and all(isinstance(r[m], int) and r[m] >= 0 for m in METRICS[5:])
            and r["n_true"] <= r["n_claims"] and r["n_claims"] + r["n_unparsed"] == r["n_sentences"])


@FEW
@given(ANY_TEXT, scenes())
def test_scorer_never_raises_and_stays_in_range(text, scene):
    assert in_range(score_caption(text, scene))


@FEW
@given(captions(), st.randoms(use_true_random=False))
def test_true_captions_score_100_in_any_sentence_order(scene_and_caption, random):
    """A true caption scores 100; every metric ignores sentence order (repeats are counted as 'not the first')."""
    scene, caption = scene_and_caption
    assert score_caption(caption, scene)["headline"] == pytest.approx(100)
    sentences = [s.strip() + " ." for s in caption.split(" .") if s.strip()]
    doubled = sentences + random.sample(sentences, k=random.randint(0, len(sentences)))  # some said twice
    shuffled = random.sample(doubled, k=len(doubled))
    a, b = score_caption(" ".join(doubled), scene), score_caption(" ".join(shuffled), scene)
    assert a == pytest.approx(b)
    assert a["repetition"] == pytest.approx(1 - len(sentences) / len(doubled))

# ---------------------------------------------------------------------------------------------------- samplers

MASK_ID = 0  # the mock vocabulary's mask; ids 1..V-1 are tokens


class MockLogits:
    """A logits_fn whose logits depend on the whole sequence (so refinement can revise), checking its inputs: the
    prompt is never altered and every id is in the vocabulary. `ties` rounds logits so confidences tie often."""

    def __init__(self, prompt, vocab, seed, ties, mask_favoured):
        g = torch.Generator().manual_seed(seed)
        self.prompt, self.vocab, self.ties = prompt, vocab, ties
        self.table = torch.randn(vocab, vocab, generator=g) * 3
        self.pos = torch.randn(256, vocab, generator=g)
        self.mask_favoured = mask_favoured   # an untrained model may well rank the mask highest: it must stay banned

    def __call__(self, ids):
        P = self.prompt.shape[1]
        assert torch.equal(ids[:, :P], self.prompt), "the sampler must never alter the prompt"
        assert ids.min() >= 0 and ids.max() < self.vocab
        logits = self.table[ids] + self.table[ids].mean(dim=1, keepdim=True) + self.pos[: ids.shape[1]]
        if self.ties:
            logits = logits.round()
        if self.mask_favoured:
            logits[..., MASK_ID] = logits.max() + 10
        return logits


@st.composite
def sampler_cases(draw):
    B, P, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(3, 9))
    num_blocks, block_length = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    gen_length = num_blocks * block_length
    tokens_per_step = draw(st.integers(1, gen_length + 2))
    prompt = torch.tensor(draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=P, max_size=P),
                                        min_size=B, max_size=B)))  # a prompt may even hold the mask id
    return dict(B=B, prompt=prompt, vocab=vocab, num_blocks=num_blocks, block_length=block_length,
                gen_length=gen_length, tokens_per_step=tokens_per_step,
                steps=steps_for(gen_length, tokens_per_step, num_blocks),
                refine=draw(st.booleans()), remasking=draw(st.sampled_from(["low_confidence", "random"])),
                temperature=draw(st.sampled_from([0.0, 1.0])), seed=draw(st.integers(0, 1000)),
                ties=draw(st.booleans()), mask_favoured=draw(st.booleans()),
                banned=draw(st.lists(st.integers(1, vocab - 1), max_size=vocab - 2, unique=True)))


@settings(max_examples=60, deadline=None)
@given(sampler_cases())
def test_samplers_end_with_no_mask_and_follow_the_schedule(case):
    c = case
    fn = MockLogits(c["prompt"], c["vocab"], c["seed"], c["ties"], c["mask_favoured"])
    out, trace = rediff.generate(fn, c["prompt"], c["gen_length"], c["steps"], block_length=c["block_length"],
                                 temperature=c["temperature"], refine=c["refine"], mask_id=MASK_ID,
                                 remasking=c["remasking"], banned_ids=c["banned"], return_trace=True,
                                 generator=torch.Generator().manual_seed(c["seed"]))
    B, G, Lb = c["B"], c["gen_length"], c["block_length"]
    assert out.shape == (B, G) and not (out == MASK_ID).any(), "no mask survives"
    assert not torch.isin(out, torch.tensor(c["banned"] or [-1])).any(), "a banned id is never written"
    steps_per_block = c["steps"] // c["num_blocks"]
    assert len(trace) == c["steps"]
    schedule = rediff.transfer_schedule(torch.full((B,), Lb), steps_per_block)            # (B, steps per block)
    assert schedule.max() <= c["tokens_per_step"], "the documented rule: never more than --tokens-per-step"
    before = torch.full((B, G), MASK_ID)
    for t in trace:
        block, i = t["block"], t["step"]
        lo, hi = block * Lb, (block + 1) * Lb
        assert torch.equal(t["new"].sum(dim=1), schedule[:, i]), "each step commits exactly the scheduled count"
        assert not (t["new"] & (before != MASK_ID)).any() and not (t["ids"][t["new"]] == MASK_ID).any()
        outside = torch.ones(G, dtype=torch.bool)
        outside[lo:hi] = False
        assert torch.equal(t["ids"][:, outside], before[:, outside]), "only the current block changes"
        if not c["refine"]:
            visible = before != MASK_ID
            assert torch.equal(t["ids"][visible], before[visible]), "the frozen sampler never revises"
        assert torch.equal(t["changed"], (before != MASK_ID) & (t["ids"] != before))
        before = t["ids"]
    assert torch.equal(before, out)


@settings(max_examples=30, deadline=None)
@given(sampler_cases(), st.floats(0.0, 1.0), st.integers(1, 8))
def test_threshold_and_stop_id_also_end_with_no_mask(case, threshold, stop_id):
    """Fast-dLLM's threshold rule (every step commits at least one) and the stop id (everything after it is it)."""
    c = case
    stop_id = min(stop_id, c["vocab"] - 1)
    fn = MockLogits(c["prompt"], c["vocab"], c["seed"], c["ties"], c["mask_favoured"])
    out, trace = rediff.generate(fn, c["prompt"], c["gen_length"], c["steps"], block_length=c["block_length"],
                                 refine=c["refine"], mask_id=MASK_ID, threshold=threshold, stop_id=stop_id,
                                 return_trace=True)
    assert out.shape == (c["B"], c["gen_length"]) and not (out == MASK_ID).any()
    assert all(t["new"].sum() >= 1 for t in trace), "every threshold step makes progress"
    after_stop = (out == stop_id).long().cumsum(dim=1) > 0
    assert (out[after_stop] == stop_id).all()


@FEW
@given(st.integers(1, 200), st.integers(1, 300), st.integers(1, 4))
def test_steps_for_never_exceeds_tokens_per_step(gen_blocks, tokens_per_step, num_blocks):
    gen_length = gen_blocks * num_blocks
    steps = steps_for(gen_length, tokens_per_step, num_blocks)
    assert steps % num_blocks == 0 and steps >= math.ceil(gen_length / tokens_per_step)
    schedule = rediff.transfer_schedule(torch.tensor([gen_length // num_blocks]), steps // num_blocks)
    assert schedule.max() <= tokens_per_step and schedule.sum() == gen_length // num_blocks

# ---------------------------------------------------------------------------------------------------- corruption


@st.composite
def corruption_cases(draw):
    B, L = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    ids = draw(st.lists(st.integers(0, WORD.vocab_size - 1).filter(lambda i: i != WORD.mask_id),
                        min_size=B * L, max_size=B * L))
    ids = torch.tensor(ids).view(B, L)
    prompt_len = draw(st.integers(0, L))
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, prompt_len:] = True
    if draw(st.booleans()):   # or any pattern at all: "prompt" is whatever answer_mask leaves out
        answer = torch.tensor(draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))).view(B, L)
    ids[:, :prompt_len] = torch.where(torch.rand(B, prompt_len) < 0.5, WORD.image_id, ids[:, :prompt_len])
    wrong = torch.tensor(draw(st.lists(st.sampled_from(WORD.ordinary_ids), min_size=B * L, max_size=B * L)))
    span = torch.tensor(draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))).view(B, L)
    return dict(ids=ids, answer=answer, wrong=wrong.view(B, L), span=span, replace_prob=draw(st.floats(0, 1)),
                t_dependent=draw(st.booleans()), hallucinate=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


@settings(max_examples=60, deadline=None)
@given(corruption_cases())
def test_corruption_never_touches_the_prompt_or_writes_a_special_id(c):
    ids, answer = c["ids"], c["answer"]
    inputs, labels, types, p = rediff.corrupt_for_revision(
        ids, answer, WORD.mask_id, WORD.ordinary_ids, c["replace_prob"], c["t_dependent"],
        c["wrong"] if c["hallucinate"] else None, c["span"] if c["hallucinate"] else None,
        generator=torch.Generator().manual_seed(c["seed"]))
    assert torch.equal(labels, ids), "labels are the clean ids"
    assert torch.equal(inputs[~answer], ids[~answer]) and (types[~answer] == rediff.IGNORE).all(), "prompt untouched"
    assert torch.equal(types == rediff.MASK, inputs == WORD.mask_id), "the mask appears exactly at MASK positions"
    special = torch.tensor(WORD.special_ids)
    changed = inputs != ids
    assert not torch.isin(inputs[changed & (types != rediff.MASK)], special).any(), "no special id is ever written"
    assert torch.equal(inputs[types == rediff.CLEAN], ids[types == rediff.CLEAN])
    hallucinated = types == rediff.HALLUCINATION
    if c["hallucinate"]:
        assert (c["span"][hallucinated]).all() and torch.equal(inputs[hallucinated], c["wrong"][hallucinated])
    else:
        assert not hallucinated.any()
    assert ((types != rediff.IGNORE) == answer).all(), "every answer position gets a type"
    assert (p >= rediff.MASK_EPS).all() and (p <= 1).all()


def test_specials_are_the_ids_corruption_avoids():
    """The property above is only meaningful if the word tokenizer's specials are exactly SPECIALS (ids 0..4)."""
    assert WORD.special_ids == list(range(len(SPECIALS))) and WORD.mask_id in WORD.special_ids
    assert not set(WORD.ordinary_ids) & set(WORD.special_ids)
