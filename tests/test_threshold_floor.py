"""tests/test_threshold_floor.py: rediff.denoise_steps' threshold_floor, worked by hand on fixed
confidences: each step commits the fixed schedule's count of the most confident masked positions
plus every other one whose confidence passes the threshold."""
import math

import torch

import rediff

MASK = 3
CONFIDENCE = [0.95, 0.5, 0.6, 0.92, 0.91, 0.4]  # of token 0 at each answer position, every step


def fixed_logits(ids):
    """(B, L) -> (B, L, 4): token 0 with probability CONFIDENCE[i] at answer position i (tokens 1
    and 2 share the rest; the mask's logit is replaced by -inf); the prompt is one token."""
    rows = [[math.log(c), math.log((1 - c) / 2), math.log((1 - c) / 2), 0.0] for c in CONFIDENCE]
    logits = torch.tensor([[0.0] * 4] + rows)                                       # (L, 4)
    return logits.expand(ids.shape[0], -1, -1)                                      # (B, L, 4)


def committed_each_step(threshold=None, floor=False):
    """The answer positions each step commits (6 tokens, 3 steps: a schedule of 2, 2, 2)."""
    x = torch.tensor([[0] + [MASK] * 6])                                            # (1, 7)
    predict = rediff.step_predictor(fixed_logits, 1, MASK)
    steps = rediff.denoise_steps(predict, x, 1, 1, 3, MASK, threshold=threshold,
                                 threshold_floor=floor)
    return [step.commit[0].nonzero().flatten().tolist() for step in steps]


def test_the_floor_adds_the_confident_positions_to_the_schedule():
    # schedule: the 2 most confident each step
    assert committed_each_step() == [[0, 3], [2, 4], [1, 5]]
    # threshold 0.9 alone: 0.95, 0.92, 0.91 at once, then one a step
    assert committed_each_step(0.9) == [[0, 3, 4], [2], [1], [5]]
    # with the floor: the schedule's 2 (0.95, 0.92) and 0.91; then the 2 best of 0.6, 0.5, 0.4
    assert committed_each_step(0.9, floor=True) == [[0, 3, 4], [1, 2], [5]]
    # nothing passes: the floor is the schedule; everything passes: one step
    assert committed_each_step(0.99, floor=True) == committed_each_step()
    assert committed_each_step(0.3, floor=True) == [[0, 1, 2, 3, 4, 5]]
