"""shapes_aids.py: training aids for the shapes world that are not in the paper.

Why they exist: the toy model's vision tower and language model start from scratch and need help
to ground the image, which LLaDA-V's pretrained SigLIP tower and 8B language model do not: per-cell
attribute pretraining of the tower, attribute image features, and one loss mean per word class
(train_stage1.py --mask-loss balanced). docs/toy_world.md measures each of them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import shapes

# ------------------------------------------------------------------------------------------------
# Vision pretraining: the paper starts from a pretrained SigLIP; the toy tower first learns to
# classify each cell's attributes.

VISION_LR = 2e-3


def attribute_classes() -> list[int]:
    """Classes per attribute group of the shapes world (shape, colour, size), each with 0 = empty
    cell."""
    return [len(shapes.SHAPES) + 1, len(shapes.COLOURS) + 1, len(shapes.SIZES) + 1]


def cell_labels(scenes, grid: int, device) -> torch.Tensor:
    """Per patch (shape, colour, size) class ids, 0 = empty cell, (B, grid * grid, 3)."""
    labels = torch.zeros(len(scenes), grid, grid, 3, dtype=torch.long)
    cell = torch.arange(grid) * 3 // grid  # the scene's row (or column) of each patch row (column)
    for b, scene in enumerate(scenes):
        for obj in scene["objects"]:
            inside = (cell[:, None] == obj["row"]) & (cell[None, :] == obj["col"])  # (grid, grid)
            labels[b, inside] = torch.tensor([shapes.SHAPES.index(obj["shape"]) + 1,
                                              shapes.COLOURS.index(obj["colour"]) + 1,
                                              shapes.SIZES.index(obj["size"]) + 1])
    return labels.flatten(1, 2).to(device)                                     # (B, N, 3)


def vision_lr(step: int, steps: int) -> float:
    """The pretraining schedule: a short linear warm-up, then a cosine from VISION_LR to 0
    (sharper final classes)."""
    warmup = min(20, steps // 10 + 1)
    if step < warmup:
        return VISION_LR * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return VISION_LR * (0.5 * (1 + math.cos(math.pi * progress)))


def all_right(logits, labels) -> torch.Tensor:
    """(B, N): whether shape, colour and size are all right; logits 3 x (B, N, classes), labels
    (B, N, 3)."""
    return torch.stack([lg.argmax(-1) == labels[..., k] for k, lg in enumerate(logits)]).all(0)


def cell_accuracy(model, head, data, device) -> float:
    """Share of `data`'s occupied cells that the tower and head get all right (pretrain_vision's
    bar, on held-out scenes)."""
    was_training = model.vision_tower.training
    model.vision_tower.eval()
    with torch.no_grad():
        tokens = model.vision_tower(data.images(list(range(len(data)))).to(device))  # (B, N, Dv)
        logits = head(tokens).split(attribute_classes(), dim=-1)
    model.vision_tower.train(was_training)
    labels = cell_labels(data.scenes, model.cfg.vision.grid, device)           # (B, N, 3)
    return all_right(logits, labels)[labels[..., 0] > 0].float().mean().item()


def pretrain_vision(model, data, steps: int, batch_size: int, device, seed: int,
                    label: str = "", held_out=None, bar: float = 0.0, max_rounds: int = 4):
    """Per-cell attribute classification on patch tokens (standing in for SigLIP's pretraining):
    rounds of `steps` steps (warm-up and cosine), each at half the previous peak rate, until the
    held-out accuracy (cell_accuracy) reaches `bar` (at most max_rounds; one round without a bar
    or held-out scenes): one round leaves some seeds' towers confusing small shapes. Returns the
    last accuracy measured (held-out, else the last batch's)."""
    grid, sizes = model.cfg.vision.grid, attribute_classes()  # grid: a multiple of 3 (check_flags)
    # With image_features "attributes" the classifier is the model's own attribute head (kept and
    # frozen afterwards); otherwise a throwaway head that only shapes the tower's patch tokens.
    head = (model.attribute_head if hasattr(model, "attribute_head")
            else nn.Linear(model.cfg.vision.width, sum(sizes))).to(device)
    params = list(model.vision_tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.0)
    rng = np.random.default_rng([seed, 10**6])
    for round_ in range(max_rounds if bar > 0 and held_out is not None else 1):
        name = label + "vision pretraining" + (f" (round {round_ + 1})" if round_ else "")
        progress = tqdm(range(steps), desc=name, dynamic_ncols=True)
        for step in progress:
            for group in optimizer.param_groups:
                group["lr"] = vision_lr(step, steps) * 0.5 ** round_
            index = rng.integers(len(data), size=batch_size)
            tokens = model.vision_tower(data.images(index).to(device))          # (B, N, Dv)
            labels = cell_labels([data.scenes[i] for i in index], grid, device)  # (B, N, 3)
            logits = head(tokens).split(sizes, dim=-1)                    # 3 x (B, N, classes)
            loss = sum(F.cross_entropy(lg.flatten(0, 1), labels[..., k].flatten())
                       for k, lg in enumerate(logits))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            accuracy = all_right(logits, labels).float().mean().item()
            progress.set_postfix(loss=f"{loss.item():.3f}", cell_acc=f"{accuracy:.3f}")
        if held_out is None:
            break
        accuracy = cell_accuracy(model, head, held_out, device)
        print(f"{name}: held-out occupied cells right {accuracy:.3f}"
              + (f" (bar {bar})" if bar > 0 else ""))
        if accuracy >= bar:
            break
    return accuracy


# ------------------------------------------------------------------------------------------------
# Attribute image features (model.py's image_features "attributes"): what the projector reads
# instead of LLaVA's patch tokens.


def attribute_probs(head_logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """The attribute head's logits (B, N, A) -> per-group class probabilities, concatenated
    (B, N, A); classes: classes per group (attribute_classes)."""
    return torch.cat([g.softmax(-1) for g in head_logits.split(classes, -1)], dim=-1)


def empty_class_index(classes: list[int]) -> list[int]:
    """Column of class 0 (= empty cell) of each attribute group in attribute_probs' output."""
    return [sum(classes[:k]) for k in range(len(classes))]


def occupied_cells(probs: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """A one-hot cell per image token, scaled by the probability that the cell holds an object
    (1 - P(empty), averaged over the attribute groups): (B, N, A) -> (B, N, N). An empty cell's
    token carries no position, so the plain average of the image tokens (what attention computes
    before it has learned to pick one) already holds which cells are occupied and how many; with
    an unscaled one-hot its cell part is the same for every image."""
    empty = probs[..., empty_class_index(classes)].mean(-1, keepdim=True)       # (B, N, 1)
    cells = torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)  # (N, N)
    return cells * (1 - empty)                                                 # (B, N, N)


def attribute_features(head_logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """The projector's input: class probabilities and occupancy-scaled cells,
    (B, N, A) -> (B, N, A + N)."""
    probs = attribute_probs(head_logits, classes)                              # (B, N, A)
    return torch.cat([probs, occupied_cells(probs, classes)], dim=-1)          # (B, N, A + N)


# ------------------------------------------------------------------------------------------------
# One loss mean per word class (--mask-loss balanced): Eq. 1's masks, another normalisation.

WORD_CLASSES = ["content", "other", "eos"]  # --mask-loss balanced: one loss mean per class


def word_classes(ids, tokenizer) -> torch.Tensor:
    """Per position (B, L): 0 = a content word only the image can tell (attribute or position),
    1 = any other word, 2 = end-of-text."""
    words = shapes.COLOURS + shapes.SHAPES + shapes.SIZES + shapes.POSITIONS  # one token each
    content = torch.tensor([tokenizer.encode(w)[0] for w in words], device=ids.device)
    classes = torch.ones_like(ids)
    classes[torch.isin(ids, content)] = 0
    classes[ids == tokenizer.eos_id] = 2
    return classes


def masked_token_loss(logits, targets, chosen, count=None):
    """Cross-entropy on the `chosen` positions only, normalised by their number pooled over the
    batch (0 when there are none). count: divide by this instead (one rank's rows of a global
    batch: the whole batch's count over the number of ranks, distributed.Context.count)."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                         reduction="none").view(targets.shape)                  # (B, L)
    return (ce * chosen).sum() / (chosen.sum().clamp(min=1) if count is None else count)


def word_class_loss(logits, targets, is_masked, word_class, n_classes: int,
                    counts: list | None = None):
    """A variant of Eq. 1 for the from-scratch toy model. The masks are Eq. 1's
    (rediff.forward_mask), but instead of one 1/t-weighted sum over all masked tokens, the masked
    answer tokens are split by word class (`word_class` (B, L) in 0 .. n_classes - 1, e.g.
    content words / other words / end-of-text) and each class gets one plain cross-entropy mean
    over its own count, like Eq. 2-3's one mean per token type; the means are summed, an empty
    class contributes 0. Why: with Eq. 1 the end-of-text padding and the template words outweigh
    the few words that only the image can tell, and the toy model never learned to read the
    image; with the 1/t weights kept, its greedy captions were worse.

    counts: per-class divisors instead of this batch's counts (one rank's rows of a global batch,
    as masked_token_loss). Returns (total, [one part per class])."""
    parts = [masked_token_loss(logits, targets, is_masked & (word_class == k),
                               None if counts is None else counts[k])
             for k in range(n_classes)]
    return sum(parts), parts
