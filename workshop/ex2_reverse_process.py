"""workshop/ex2_reverse_process.py: exercise 2, one step of LLaDA's reverse process.

Goal
    Write the step that a LLaDA-style sampler repeats until no [MASK] is left: predict every
    position, then commit (unmask) only the k masked positions the model is most confident
    about; the rest stay masked for the next step, and a committed token never changes again
    (the "frozen" sampler). Then watch what happens when k grows: the base model captions the
    same scene at 1 and at 8 tokens per step.

Paper
    Section 3.1, the reverse process ("unmasks a few high-confidence tokens, re-masks the rest"),
    and the error cascade of parallel decoding (Section 1, Figure 1 (a)).

Where the project implements it (read it afterwards)
    rediff.py: generate (the loop; refine=False is this step), transfer_schedule (k at every
    step), chosen_probability (the confidence); sample.py: caption_images (the model's logits).

Your task
    Fill in the three TODO lines of commit_step.

Run
    python workshop/check.py 2
    # the base model (out/base.safetensors, trained in the background since the start):
    python sample.py --ckpt out/base.safetensors --scene-seed 3 --tokens-per-step 1 --no-refine
    python sample.py --ckpt out/base.safetensors --scene-seed 3 --tokens-per-step 8 --no-refine

Expected output
    `check.py 2` ends with "exercise 2: all 4 checks passed" once the TODOs are done.
    Each sample.py command prints the scene's ground truth, the caption, its score (headline,
    factuality, coverage, syntax, repetition) and the sampler's line: frozen, 48 forward passes
    at 1 token per step, 6 at 8. The captions depend on your training run. Over 200 test scenes
    the README measured this base at headline 80.2 with 1 token per step and 33.9 with 8 (the
    share of sentences that parse: 0.995 and 0.460): expect a clean caption at 1 token per step
    and, at 8, sentences that stop parsing, repeated or lost words, wrong attributes. Try other
    --scene-seed values: the gap is not the same on every scene.

Questions to discuss
    1. At 8 tokens per step the 48-token answer is written in 6 steps. Why do tokens committed
       in the same step disagree with each other (two colours for one object), when each one
       alone is likely?
    2. The frozen sampler never changes a committed token. Which lines of commit_step make sure
       of that, and what would it take to lift the rule? (Exercise 3.)
    3. End-of-text padding is usually committed first, from the end of the answer inwards. Why is
       it the most confident token, and what does that do to the length of the captions?
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import rediff  # noqa: E402
from workshop.todo import TODO  # noqa: E402


def commit_step(x, logits, mask_id: int, steps: int):
    """One step of the frozen (LLaDA) sampler on the answer x (B, G), `steps` steps left.

    logits (B, G, V): the model's prediction at every answer position (never mask_id).
    Returns the new answer (B, G): the k most confident masked positions of each row hold their
    argmax, every other position is unchanged (k: rediff.transfer_schedule's count for now)."""
    is_masked = x == mask_id                                                  # (B, G)
    k = rediff.transfer_schedule(is_masked.sum(dim=1), steps)[:, 0]           # (B,) to commit now
    x0 = logits.argmax(dim=-1)                                                # (B, G) the guesses
    probability = TODO("softmax(logits) at each guess x0 (B, G): rediff.chosen_probability")
    confidence = TODO("probability at masked positions, -inf at visible ones (B, G)")
    commit = torch.zeros_like(is_masked)                                      # (B, G) bool
    for row in range(x.shape[0]):                                             # k differs per row
        commit[row, TODO("the indices of the k[row] largest confidences of this row")] = True
    return torch.where(commit, x0, x)
