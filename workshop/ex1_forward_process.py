"""workshop/ex1_forward_process.py: exercise 1, the forward process and the loss of Eq. 1.

Goal
    Write the two pieces every masked diffusion language model is trained with: the forward
    process, which hides a random share t of the answer's tokens behind [MASK], and Eq. 1, the
    loss that asks the model to guess the hidden tokens back, each guess weighted by 1/t.

Paper
    Section 3.1 (discrete diffusion models), Eq. 1. t ~ U(0, 1) per answer; the code uses
    p = (1 - eps) t + eps with eps = 1e-3 (as LLaDA does), and p is also the t of the 1/t weight.

Where the project implements it (read it afterwards)
    rediff.py: sample_mask_ratio, forward_mask, masked_diffusion_loss; train_stage1.py calls
    them in training_loss (--objective mask --mask-loss eq1).

Your task
    Fill in the four TODO lines below (forward_mask: 2, masked_diffusion_loss: 2).

Run
    python workshop/check.py 1              # your two functions
    python workshop/ex1_forward_process.py  # masks a caption at four values of t, then Eq. 1
    `check.py 1` ends with "exercise 1: all 5 checks passed" once the TODOs are done.

Expected output of `python workshop/ex1_forward_process.py` once the TODOs are done (measured):
    caption: we can see a small green circle at the bottom .
    t = 0.497 | we [M] see [M] small [M] [M] [M] [M] [M] .
    t = 0.758 | we [M] [M] [M] [M] [M] [M] [M] [M] [M] [M]
    t = 0.615 | we [M] [M] [M] [M] [M] [M] [M] the [M] .
    t = 0.005 | we can see a small green circle at the bottom .
    3-token example, t = 0.5: Eq. 1 = 0.653886 (by hand: (ln 2 + ln 4/3) / 0.5 / 3 = 0.653886)
    the same masks at t = 1:  Eq. 1 = 0.326943 (the 1/t weight halves it)

Questions to discuss
    1. Why weight each masked token by 1/t? Compare what a row masked at t = 0.05 and a row
       masked at t = 0.9 contribute, knowing that t L of an answer's L tokens are masked on
       average.
    2. A model that knows nothing predicts the uniform distribution over the V words. What is
       its Eq. 1 loss, on average over t and over the masks?
    3. Why is the prompt (image tokens and question) never masked, and why p = (1 - eps) t + eps
       rather than t itself?
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import rediff  # noqa: E402
from data import shapes  # noqa: E402
from data.tokenizer import WordTokenizer  # noqa: E402
from workshop.todo import TODO, Todo  # noqa: E402


def forward_mask(ids, answer_mask, mask_id: int, eps: float = rediff.MASK_EPS, generator=None):
    """Section 3.1, the forward process q(x_t | x_0): each answer token becomes mask_id with
    probability p. ids (B, L): prompt then answer; answer_mask (B, L) bool: the answer.
    Returns (noisy ids (B, L), is_masked (B, L) bool, p (B,))."""
    p = rediff.sample_mask_ratio(ids.shape[0], eps, generator, ids.device)  # (B,) (1 - eps) t + eps
    draws = torch.rand(ids.shape, generator=generator, device=ids.device)   # (B, L) one per token
    is_masked = TODO("True where a token's draw is below its row's p, at answer positions only")
    noisy = TODO("mask_id where is_masked, the original id everywhere else (B, L)")
    return noisy, is_masked, p


def masked_diffusion_loss(logits, targets, is_masked, p, answer_mask):
    """Eq. 1: cross-entropy on the masked answer tokens, each weighted by 1/t; each row's sum is
    divided by its answer length, then the rows are averaged. logits (B, L, V), targets (B, L),
    is_masked and answer_mask (B, L) bool, p (B,). Returns a scalar."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    ce = ce.view(targets.shape)                                                  # (B, L)
    weighted = TODO("ce at masked positions divided by the row's p, 0 elsewhere (B, L)")
    answer_len = answer_mask.sum(dim=1).clamp(min=1)                             # (B,)
    return TODO("each row's sum of `weighted` divided by its answer_len; the mean over rows")


# ------------------------------------------------------------------------------------------------
# The demo (python workshop/ex1_forward_process.py)

MASK_WORD = "[M]"


def three_token_example(t: float):
    """Eq. 1 by hand: a prompt of 1 token and an answer of 3; vocabulary {0, 1}; answer positions
    1 and 3 masked. Position 1: logits (0, 0), CE = ln 2. Position 3: logits (ln 3, 0) and
    target 0, probability 3/4, CE = ln 4/3. Eq. 1 = (ln 2 + ln 4/3) / t / 3."""
    logits = torch.zeros(1, 4, 2)                                                # (B, L, V)
    logits[0, 3, 0] = math.log(3.0)
    targets = torch.tensor([[1, 0, 1, 0]])
    is_masked = torch.tensor([[False, True, False, True]])
    answer_mask = torch.tensor([[False, True, True, True]])
    return masked_diffusion_loss(logits, targets, is_masked, torch.tensor([t]), answer_mask)


def main():
    tokenizer = WordTokenizer.for_shapes_world()
    words = shapes.sample("test", 1)["caption"].split()
    caption = " ".join(words[:words.index(".") + 1])                          # the first sentence
    prompt = tokenizer.encode("describe the image .")
    ids = torch.tensor([prompt + tokenizer.encode(caption)])                    # (1, L)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    answer_mask[:, len(prompt):] = True
    print(f"caption: {caption}")
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        noisy, _, p = forward_mask(ids, answer_mask, tokenizer.mask_id, generator=generator)
        shown = [MASK_WORD if i == tokenizer.mask_id else tokenizer.decode([i])
                 for i in noisy[0, len(prompt):].tolist()]
        print(f"t = {p.item():.3f} | {' '.join(shown)}")
    by_hand = (math.log(2) + math.log(4 / 3)) / 0.5 / 3
    print(f"3-token example, t = 0.5: Eq. 1 = {three_token_example(0.5).item():.6f} "
          f"(by hand: (ln 2 + ln 4/3) / 0.5 / 3 = {by_hand:.6f})")
    print(f"the same masks at t = 1:  Eq. 1 = {three_token_example(1.0).item():.6f} "
          f"(the 1/t weight halves it)")


if __name__ == "__main__":
    try:
        main()
    except Todo as todo:
        sys.exit(f"not finished: a TODO is still there ({todo}); "
                 f"python workshop/check.py 1 shows where")
