"""workshop/ex5_stage2.py: exercise 5, Stage II: an expert's fixes of the model's own draft, Eq. 4.

Goal
    Stage II trains the model on its own mistakes. The model drafts a caption; an expert (o4-mini
    in the paper; here the shapes world's oracle, which knows the scene) answers with
    {"org": wrong segment, "target": correction} pairs. A pair is kept only if its target has as
    many tokens as its org and its org occurs exactly once in the draft (then it can be placed on
    the draft's tokens). The kept pairs give the refined caption and the mistake mask, and Eq. 4
    trains the model, fed its own unmasked draft, to write the refined tokens at the corrected
    positions only. Then run one Stage II round and read its counts.

Paper
    Section 3.3 (online self-correction learning), Eq. 4; the expert's rules in the appendix.

Where the project implements it (read it afterwards)
    experts.py: validate_pairs and occurrences (which pairs are kept, with more rules: empty,
    unchanged or overlapping pairs), OracleExpert; train_stage2.py: apply_corrections (refined ids
    and mistake mask), align, round_report (the counts); rediff.py: refinement_loss (Eq. 4).

Your task
    Fill in the TODO lines of keep_pairs (2), build_targets (2) and refinement_loss (2). Eq. 4 per
    draft: each draft with at least one corrected token gets the mean cross-entropy over its own
    corrected positions; the loss is the mean over those drafts (0 when no draft has one). No
    1/t: nothing is masked.

Run
    python workshop/check.py 5
    python workshop/ex5_stage2.py     # the draft and the expert's pairs below, step by step
    # one Stage II round with the oracle expert (needs out/stage1.safetensors):
    python train_stage2.py --tiny --init-from out/stage1.safetensors --out out/stage2.safetensors
    `check.py 5` ends with "exercise 5: all 6 checks passed" once the TODOs are done.

Expected output of `python workshop/ex5_stage2.py` once the TODOs are done (measured):
    draft  : there is a red circle at the top . a red circle is at the left .
    kept   : red circle at the top -> blue circle at the top (at 3)
    dropped: red circle -> blue square (org occurs 2 times)
    kept   : left -> bottom-left (at 15)
    dropped: at the left -> at the bottom left (3 tokens -> 4)
    dropped: a green star -> a green cross (org occurs 0 times)
    refined: there is a blue circle at the top . a red circle is at the bottom-left .
    mistake: . . . X X X X X . . . . . . . X . . . .
    Eq. 4 of a model that keeps its draft, 0.9 on it: 2.1549
    Eq. 4 of a model that writes the refined caption, 0.9 on it: 0.1054

Expected output of the Stage II round
    A config block, progress bars for the drafts (3,072 scenes, a third each at 1, 4 and 8 tokens
    per step) and for the fine-tuning (120 steps), then the round's report:
        round 1/1 | drafts made 3072 (1 tok/step: 1024 drafts, headline ..., 4 tok/step: ...)
        round 1/1 | expert oracle: right ..., no answer 0, pairs proposed ..., kept ..., ...
        round 1/1 | alignment: ... training samples (... drafts left with no valid pair), ...
          example draft (... tok/step): ...
          expert fixes: '...' -> '...'
    The counts depend on your Stage I model; the README reports about 2,400-2,700 oracle pairs
    for a round of this recipe. The drafts' headline falls from 1 to 8 tokens per step, as in
    exercise 2. Measured times are in teacher.md.

Questions to discuss
    1. Why must a target have as many tokens as its org? What would a shorter correction do to
       the positions after it, in a model whose answer is a fixed-length canvas of tokens?
    2. Eq. 4 scores only the corrected positions, not the whole draft. What does the model learn
       about the tokens the expert did not touch, and why is that deliberate (the paper: errors
       "the expert model may have missed")?
    3. Read the round's counts: which drafting speed gives the most corrections, and are they
       single words or whole sentences? The README's Results discuss what that does to Stage II.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from data.tokenizer import WordTokenizer  # noqa: E402
from experts import occurrences  # noqa: E402
from workshop.todo import TODO, Todo  # noqa: E402


def keep_pairs(pairs, draft_ids, tokenizer):
    """The expert's pairs -> the kept ones as (start position in the draft, target ids), sorted.

    pairs: a list of {"org": str, "target": str}; draft_ids: the draft's answer ids (end-of-text
    padding after the caption). A pair is kept when org and target have the same number of
    tokens and org occurs exactly once in the draft."""
    draft_ids = [int(i) for i in draft_ids]
    if tokenizer.eos_id in draft_ids:
        draft_ids = draft_ids[:draft_ids.index(tokenizer.eos_id)]            # the caption only
    kept = []
    for pair in pairs:
        org, target = tokenizer.encode(pair["org"]), tokenizer.encode(pair["target"])
        starts = occurrences(draft_ids, org)                                  # every start of org
        if TODO("the condition under which this pair is kept (True or False)"):
            kept.append(TODO("(the start of org in the draft, the target's ids)"))
    return sorted(kept)


def build_targets(draft_ids, kept):
    """Draft answer ids (G,) and kept (start, target ids) pairs -> (refined ids (G,), mistake
    mask (G,) bool): the draft with each target written over its org, True where a target is."""
    refined, mistake = draft_ids.clone(), torch.zeros_like(draft_ids, dtype=torch.bool)
    for start, target in kept:
        refined[start:start + len(target)] = TODO("the target's ids, as a tensor")
        mistake[start:start + len(target)] = TODO("these positions are corrected")
    return refined, mistake


def refinement_loss(logits, refined, mistake_mask):
    """Eq. 4, per draft. logits (B, G, V) of the model fed its own drafts, refined (B, G),
    mistake_mask (B, G) bool. Returns a scalar: the mean over the drafts that have a correction
    of each one's mean CE over its corrected positions; 0 when no draft has a correction."""
    ce = F.cross_entropy(logits.flatten(0, 1), refined.flatten(), reduction="none")
    ce = ce.view(refined.shape)                                               # (B, G)
    corrected = mistake_mask.any(dim=1)                                       # (B,) has a fix
    if not corrected.any():
        return ce.sum() * 0.0                                                 # nothing to learn
    per_draft = TODO("each draft's mean of ce over its own corrected positions (B,)")
    return TODO("the mean of per_draft over the drafts that have a correction (a scalar)")


# ------------------------------------------------------------------------------------------------
# The demo (python workshop/ex5_stage2.py)

DRAFT = "there is a red circle at the top . a red circle is at the left ."
ANSWER_LEN = 20
EXPERT_PAIRS = [{"org": "red circle at the top", "target": "blue circle at the top"},
                {"org": "red circle", "target": "blue square"},
                {"org": "left", "target": "bottom-left"},
                {"org": "at the left", "target": "at the bottom left"},
                {"org": "a green star", "target": "a green cross"}]
SURE = 0.9  # the probability the demo's two models give their guess


def sure_logits(guess, vocab_size: int):
    """Logits (B, L, V) of a model that gives probability SURE to `guess` (B, L), the rest
    shared evenly by the other words."""
    rest = torch.full((*guess.shape, vocab_size), math.log((1 - SURE) / (vocab_size - 1)))
    return rest.scatter(-1, guess[..., None], math.log(SURE))


def main():
    tokenizer = WordTokenizer.for_shapes_world()
    words = tokenizer.encode(DRAFT)
    draft = torch.tensor(words + [tokenizer.eos_id] * (ANSWER_LEN - len(words)))  # (G,)
    print(f"draft  : {tokenizer.decode(draft.tolist())}")
    kept = keep_pairs(EXPERT_PAIRS, draft, tokenizer)
    for pair in EXPERT_PAIRS:
        org, target = tokenizer.encode(pair["org"]), tokenizer.encode(pair["target"])
        starts = occurrences(words, org)
        change = f"{pair['org']} -> {pair['target']}"
        if len(starts) == 1 and (starts[0], target) in kept:
            print(f"kept   : {change} (at {starts[0]})")
        elif len(org) != len(target):
            print(f"dropped: {change} ({len(org)} tokens -> {len(target)})")
        else:
            print(f"dropped: {change} (org occurs {len(starts)} times)")
    refined, mistake = build_targets(draft, kept)
    print(f"refined: {tokenizer.decode(refined.tolist())}")
    print(f"mistake: {' '.join('X' if m else '.' for m in mistake.tolist())}")
    for title, guess in (("keeps its draft", draft), ("writes the refined caption", refined)):
        logits = sure_logits(guess[None], tokenizer.vocab_size)              # (1, G, V)
        loss = refinement_loss(logits, refined[None], mistake[None])
        print(f"Eq. 4 of a model that {title}, {SURE} on it: {loss.item():.4f}")


if __name__ == "__main__":
    try:
        main()
    except Todo as todo:
        sys.exit(f"not finished: a TODO is still there ({todo}); "
                 f"python workshop/check.py 5 shows where")
