"""workshop/ex4_stage1.py: exercise 4, Stage I: corrupt a caption and compute the typed losses.

Goal
    Stage I teaches the model to revise, not only to fill in masks. A training caption is masked
    as in Eq. 1, then some of the tokens left visible are polluted: random replacements (syntax
    errors) and a hallucinated word (a true attribute swapped for a false one). The model must
    predict the clean caption everywhere, and the loss keeps one term per kind of token, so the
    few corrupted tokens are not drowned by the many clean ones.

Paper
    Section 3.2 (foundational revision training), Eq. 2 (one term per type: mask, syntax,
    hallucination, clean; each 1/t-weighted and divided by N_type, the number of tokens of that
    type) and Eq. 3 (their sum).

Where the project implements it (read it afterwards)
    rediff.py: corrupt_for_revision (the corruption and every position's type), typed_losses
    (Eq. 2-3), hallucination_rows; data/shapes.py: hallucination_pair; train_stage1.py:
    training_loss. The demo puts the hallucinated word on a visible token, as the paper's text
    does (train_stage1.py --hallucination-form visible); by default the project follows the
    official code instead: a hallucination pair is a row of its own, the whole altered caption
    visible and only the altered words scored (rediff.hallucination_rows).

Your task
    Fill in the three TODO lines of typed_losses. N_type is counted in each caption (row) on its
    own: a caption with one syntax error weighs it as much as a caption with five weighs its
    five. For row r and type k:
        term[r, k] = (sum of CE / t[r] over row r's tokens of type k) / (their number in row r),
                     0 when row r has no token of type k;
        parts[k] = mean over rows of term[r, k];   total = sum over k of parts[k].

Run
    python workshop/check.py 4
    python workshop/ex4_stage1.py     # corrupts a caption, prints each token's type and losses
    `check.py 4` ends with "exercise 4: all 3 checks passed" once the TODOs are done.

Expected output of `python workshop/ex4_stage1.py` once the TODOs are done (measured):
    caption : a large red cross is at the top-left .
    t = 0.163, replacement rate 0.1; the hallucinated word: cross -> triangle
    position  clean     model input  type
           0  a         a            clean
           1  large     large        clean
           2  red       red          clean
           3  cross     triangle     hallucination
           4  is        [M]          mask
           5  at        at           clean
           6  the       right        syntax
           7  top-left  top-left     clean
           8  .         .            clean
    typed losses of a model that copies the visible tokens (it never revises), 0.9 on its guess:
      mask 0.6450 | syntax 38.2840 | hallucination 38.2840 | clean 0.6450 | total 77.8579
    typed losses of a model that predicts the clean caption, 0.9 on its guess:
      mask 0.6450 | syntax 0.6450 | hallucination 0.6450 | clean 0.6450 | total 2.5799

Questions to discuss
    1. Why one term per type, each divided by its own count, rather than one mean over all the
       tokens? Count the tokens of each type in a 48-token answer at t = 0.5 with a replacement
       rate of 0.1. (The demo's second model gives a hint: 6 clean tokens, 1 syntax token.)
    2. The clean term trains the model to write the visible token it already sees. Why is that
       needed? (Think of the refining sampler of exercise 3, which re-predicts every visible
       token.)
    3. Syntax errors here are random words. How do they differ from the mistakes the model itself
       makes at 8 tokens per step, and which stage of ReDiff deals with that? (Exercise 5.)
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import rediff  # noqa: E402
from data import shapes  # noqa: E402
from data.tokenizer import WordTokenizer  # noqa: E402
from workshop.todo import TODO, Todo  # noqa: E402


def typed_losses(logits, labels, types, p):
    """Eq. 2-3, per row. logits (B, L, V), labels (B, L): the clean ids, types (B, L): rediff's
    IGNORE, MASK, SYNTAX, HALLUCINATION or CLEAN, p (B,): each row's t.
    Returns (total, {"mask": part, "syntax": part, "hallucination": part, "clean": part})."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    weighted = ce.view(labels.shape) / p[:, None]                             # (B, L) 1/t weights
    parts = {}
    for type_id, name in rediff.TYPE_NAMES.items():
        chosen = types == type_id                                             # (B, L) bool
        row_sum = TODO("each row's sum of `weighted` over its positions of this type (B,)")
        row_count = TODO("each row's number of positions of this type (B,)")
        parts[name] = TODO("the mean over rows of row_sum / row_count, 0 for a row without any")
    return sum(parts.values()), parts


# ------------------------------------------------------------------------------------------------
# The demo (python workshop/ex4_stage1.py)

SCENE, SEED = 0, 16  # a test scene whose first sentence gets a syntax error and a hallucination
SURE = 0.9           # the probability the demo's two models give their guess


def corrupt_one_caption(tokenizer):
    """The first sentence of test scene SCENE, masked and corrupted by the project's
    rediff.corrupt_for_revision with a hallucination pair of data/shapes.py.
    Returns (words, inputs (1, L), labels (1, L), types (1, L), p (1,), pair)."""
    sample = shapes.sample("test", SCENE)
    words = sample["caption"].split()
    caption = " ".join(words[:words.index(".") + 1])
    pair = shapes.hallucination_pair(sample["scene"], caption, np.random.default_rng(SEED))
    ids = torch.tensor([tokenizer.encode(caption)])                           # (1, L): no prompt
    wrong = torch.tensor([tokenizer.encode(pair["wrong"])])                   # (1, L)
    span = torch.zeros_like(ids, dtype=torch.bool)
    span[0, pair["span"][0]:pair["span"][1]] = True
    inputs, labels, types, p = rediff.corrupt_for_revision(
        ids, torch.ones_like(span), tokenizer.mask_id, tokenizer.ordinary_ids, 0.1,
        wrong_ids=wrong, wrong_span=span, generator=torch.Generator().manual_seed(SEED))
    return caption.split(), inputs, labels, types, p, pair


def sure_logits(guess, vocab_size: int):
    """Logits (B, L, V) of a model that gives probability SURE to `guess` (B, L), the rest
    shared evenly by the other words."""
    rest = torch.full((*guess.shape, vocab_size), math.log((1 - SURE) / (vocab_size - 1)))
    return rest.scatter(-1, guess[..., None], math.log(SURE))


def main():
    tokenizer = WordTokenizer.for_shapes_world()
    words, inputs, labels, types, p, pair = corrupt_one_caption(tokenizer)
    span = slice(*pair["span"])
    print(f"caption : {' '.join(words)}")
    print(f"t = {p.item():.3f}, replacement rate 0.1; the hallucinated word: "
          f"{' '.join(words[span])} -> {' '.join(pair['wrong'].split()[span])}")
    print("position  clean     model input  type")
    for i, (word, seen, kind) in enumerate(zip(words, inputs[0].tolist(), types[0].tolist())):
        shown = "[M]" if seen == tokenizer.mask_id else tokenizer.decode([seen])
        print(f"{i:8d}  {word:<9} {shown:<12} {rediff.TYPE_NAMES[kind]}")
    visible = torch.where(inputs == tokenizer.mask_id, labels, inputs)        # it guesses masks
    models = (("a model that copies the visible tokens (it never revises)", visible),
              ("a model that predicts the clean caption", labels))
    for title, guess in models:
        total, parts = typed_losses(sure_logits(guess, tokenizer.vocab_size), labels, types, p)
        shown = " | ".join(f"{name} {value.item():.4f}" for name, value in parts.items())
        print(f"typed losses of {title}, {SURE} on its guess:")
        print(f"  {shown} | total {total.item():.4f}")


if __name__ == "__main__":
    try:
        main()
    except Todo as todo:
        sys.exit(f"not finished: a TODO is still there ({todo}); "
                 f"python workshop/check.py 4 shows where")
