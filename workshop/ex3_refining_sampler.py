"""workshop/ex3_refining_sampler.py: exercise 3, the refining rule of ReDiff's sampler.

Goal
    Turn the frozen sampler of exercise 2 into ReDiff's: at every step, every token that was
    already visible before the step is overwritten with the model's current prediction for it,
    so an early mistake can still be revised. It costs no extra forward pass: the same logits
    serve the commits and the revisions. Then run the Stage I model with --trace and find a
    token that was revised.

Paper
    Section 3.4 (inference: refinement in every generation step), Figure 4 (a refinement trace).

Where the project implements it (read it afterwards)
    rediff.py: generate(refine=True), the lines under "if refine:"; the trace
    (return_trace=True) and sample.py: trace_lines and trace_html, which draw it.

Your task
    Fill in the two TODO lines of refining_step. The frozen commits are done for you by
    frozen_step (the project's own sampler run for one step: exercise 2's answer).

Run
    python workshop/check.py 3
    # the Stage I model (out/stage1.safetensors, trained in the background after the base):
    python sample.py --ckpt out/stage1.safetensors --scene-seed 0 --tokens-per-step 8 --trace \
        --trace-out out/trace.html
    python sample.py --ckpt out/stage1.safetensors --scene-seed 0 --tokens-per-step 8 --no-refine

Expected output
    `check.py 3` ends with "exercise 3: all 4 checks passed" once the TODOs are done.
    The --trace command prints one line per step ("step   0 | _ _ ... "): masks as "_", the
    tokens committed at that step in green, the tokens revised at that step in bold yellow; then
    "trace written to out/trace.html" (open it in a browser: revised tokens are orange, the old
    token struck through), the caption, its score and the sampler's line (refining, 6 forward
    passes). Which tokens are revised depends on your training run; if scene 0 shows none, try
    --scene-seed 1, 2, ... Over 100 test scenes the README measured Stage I models of this recipe
    (3 seeds) at headline 76.1 +- 1.4 with 1 token per step and 50.9 +- 11.9 with 8, against
    81.1 and 20.2 for the mask-trained baseline with the frozen sampler: the refining model
    keeps more of its quality when it goes 8 times faster.

Questions to discuss
    1. A token committed at a step is not revised until the next step. What happens to the
       tokens committed at the very last step? (The README measures it: "What the last step
       leaves unrevised".)
    2. The base model of exercise 2 gets much worse with the refining sampler (headline 26.9
       against 80.2 at 1 token per step in the README). Why does re-predicting visible tokens
       hurt a model that was only trained to fill in masks?
    3. A revised token may change again at a later step. What stops the sampler from going on
       forever, and is the last word then always the best one?
"""
import os
import sys

import torch  # noqa: F401  (your lines need it)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import rediff  # noqa: E402
from workshop.todo import TODO  # noqa: E402


def frozen_step(x, logits, mask_id: int, steps: int):
    """Exercise 2's step, by the project's own sampler: the first step of rediff.generate
    (refine=False) on the answer x (B, G) with these logits (B, G, V), `steps` steps left.
    Returns the answer after it (B, G)."""
    _, trace = rediff.generate(lambda ids: logits, x[:, :0], x.shape[1], steps, mask_id=mask_id,
                               draft=x, return_trace=True)
    return trace[0]["ids"]


def refining_step(x, logits, mask_id: int, steps: int):
    """One step of ReDiff's refining sampler (Section 3.4) on the answer x (B, G), `steps` left.

    The masked positions are committed as in the frozen sampler; every position that was
    visible before this step takes this step's prediction. Returns the new answer (B, G)."""
    committed = frozen_step(x, logits, mask_id, steps)                        # (B, G) commits done
    x0 = logits.argmax(dim=-1)                                                # (B, G) the guesses
    revisable = TODO("the positions that were visible (not mask_id) before this step (B, G)")
    return TODO("x0 at the revisable positions, `committed` everywhere else (B, G)")
