"""rediff.py: the paper's maths as pure functions: forward masking, the losses of Eq. 1-4, Stage I
corruption, and the frozen (LLaDA) and refining (ReDiff) samplers.

Paper: "From Denoising to Refining: A Corrective Framework for Vision-Language Diffusion Model"
(arXiv 2510.19871). Shapes: B batch, L sequence length, P prompt length, G generated length, V
vocabulary. A "sequence" is the prompt (image placeholders + question), then the answer;
`answer_mask` (B, L) marks the answer, the only positions ever masked, corrupted or scored.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

MASK_EPS = 1e-3  # p = (1 - eps) t + eps, so no sample is left entirely unmasked (LLaDA)

# Token types of Stage I (Section 3.2): which loss term of Eq. 2 a position belongs to.
IGNORE, MASK, SYNTAX, HALLUCINATION, CLEAN = 0, 1, 2, 3, 4
TYPE_NAMES = {MASK: "mask", SYNTAX: "syntax", HALLUCINATION: "hallucination", CLEAN: "clean"}


# -------------------------------------------------------------------------------------------------
# Forward process and the masked-diffusion loss (Section 3.1, Eq. 1)


def sample_mask_ratio(batch: int, eps: float = MASK_EPS, generator=None, device="cpu"):
    """Section 3.1: t ~ U(0, 1) per sample, as the masking probability p = (1 - eps) t + eps, (B,).
    Following LLaDA, this p is also the `t` of the 1/t weights in Eq. 1-2."""
    t = torch.rand(batch, generator=generator, device=device)
    return (1 - eps) * t + eps


def forward_mask(ids, answer_mask, mask_id: int, eps: float = MASK_EPS, generator=None):
    """Section 3.1, the forward process q(x_t | x_0): each answer token becomes [MASK] with
    probability p. Returns (noisy ids (B, L), is_masked (B, L) bool, p (B,))."""
    p = sample_mask_ratio(ids.shape[0], eps, generator, ids.device)                    # (B,)
    draws = torch.rand(ids.shape, generator=generator, device=ids.device)              # (B, L)
    is_masked = (draws < p[:, None]) & answer_mask
    return torch.where(is_masked, torch.full_like(ids, mask_id), ids), is_masked, p


def token_cross_entropy(logits, labels):
    """The cross-entropy of each position in Eq. 1-4, (B, L): logits (B, L, V), labels (B, L)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


def masked_diffusion_loss(logits, targets, is_masked, p, answer_mask):
    """Eq. 1: cross-entropy on masked answer tokens, each weighted by 1/t. As in LLaDA's supervised
    fine-tuning, each sample's sum is divided by its answer length and the batch is averaged: an
    unbiased estimate of the per-token negative log-likelihood bound."""
    weighted = token_cross_entropy(logits, targets) * is_masked / p[:, None]          # (B, L)
    answer_len = answer_mask.sum(dim=1).clamp(min=1)                                   # (B,)
    return (weighted.sum(dim=1) / answer_len).mean()


# -------------------------------------------------------------------------------------------------
# Stage I: foundational revision (Section 3.2, Eq. 2-3)


def replacement_rate(p, replace_prob: float, t_dependent: bool = False):
    """Probability of replacing a visible answer token, (B,). Fixed by default (Section 3.2: 0.1;
    the official code: 0.05); Table 5's t-dependent rate is t itself while t < replace_prob."""
    if t_dependent:
        return torch.minimum(p, torch.full_like(p, replace_prob))
    return torch.full_like(p, replace_prob)


def corrupt_for_revision(ids, answer_mask, mask_id: int, ordinary_ids, replace_prob: float = 0.1,
                         t_dependent: bool = False, wrong_ids=None, wrong_span=None,
                         eps: float = MASK_EPS, generator=None):
    """Section 3.2: mask the answer as in Eq. 1, then pollute the tokens that stayed visible.

    - syntax errors: each visible answer token is replaced, with probability `replace_prob`, by a
      token drawn uniformly from `ordinary_ids` (never a special id, never the mask);
    - hallucinations (ViCrit pairs): where `wrong_span` (B, L) is set, the visible input holds
      `wrong_ids`, the label keeps the correct token.
    Returns (inputs (B, L), labels (B, L) = the clean ids, types (B, L) in {IGNORE, MASK, SYNTAX,
    HALLUCINATION, CLEAN}, p (B,))."""
    noisy, is_masked, p = forward_mask(ids, answer_mask, mask_id, eps, generator)
    visible = answer_mask & ~is_masked                                                  # (B, L)
    types = torch.full_like(ids, IGNORE)
    types[is_masked] = MASK
    inputs = noisy.clone()
    hallucinated = torch.zeros_like(visible)
    if wrong_span is not None:
        hallucinated = visible & wrong_span & (wrong_ids != ids)
        inputs = torch.where(hallucinated, wrong_ids, inputs)
    rate = replacement_rate(p, replace_prob, t_dependent)                               # (B,)
    draws = torch.rand(ids.shape, generator=generator, device=ids.device)               # (B, L)
    replaced = visible & ~hallucinated & (draws < rate[:, None])
    ordinary_ids = torch.as_tensor(ordinary_ids, device=ids.device)
    picks = torch.randint(len(ordinary_ids), ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(replaced, ordinary_ids[picks], inputs)
    types[replaced] = SYNTAX  # a draw may pick the original token back: a harmless no-op
    types[hallucinated] = HALLUCINATION
    types[visible & ~replaced & ~hallucinated] = CLEAN
    return inputs, ids, types, p


def hallucination_rows(ids, answer_mask, wrong_ids, wrong_span, inputs, types, p):
    """Section 3.2's hallucination data as the official code builds it: a row holding a pair
    becomes a row of its own, the whole altered caption visible (no masks, no replacements), the
    loss on the altered span only, as one more type term of Eq. 2 with t = 1 (the official code
    divides by a random t here, its authors' comment says it should not). The paper's text puts the
    pair on the tokens left visible after masking instead: corrupt_for_revision(wrong_ids=...).

    inputs, types, p: corrupt_for_revision's output for the batch without the pairs; the rows that
    hold a pair are replaced. Returns (inputs (B, L), types (B, L), p (B,))."""
    altered = answer_mask & wrong_span & (wrong_ids != ids)                              # (B, L)
    is_row = altered.any(dim=1)                                                          # (B,)
    inputs = torch.where(is_row[:, None] & answer_mask, wrong_ids, inputs)
    types = torch.where(is_row[:, None], torch.where(altered, HALLUCINATION, IGNORE), types)
    return inputs, types, torch.where(is_row, torch.ones_like(p), p)


def per_row_mean(values, chosen):
    """Eq. 2-4's 1/N: each row's mean of `values` over its `chosen` positions, (B,), 0 for none."""
    return (values * chosen).sum(dim=1) / chosen.sum(dim=1).clamp(min=1)


def typed_losses(logits, labels, types, p):
    """Eq. 2-3, per sample as the paper writes them: in each row, each type's (mask, syntax,
    hallucination, clean) 1/t-weighted cross-entropy is averaged over the row's own count N_type
    (0 for a type the row lacks), the types are summed, and the rows averaged. Returns (total,
    {name: part}), part = the batch mean of the rows' terms of that type; total = sum of the parts.

    Per row, as in the official code's loop: a row with one syntax error weighs it as much as a row
    with five weighs its five; so equal shards' rows average to the whole batch (distributed.py)."""
    weighted = token_cross_entropy(logits, labels) / p[:, None]                        # (B, L)
    parts = {name: per_row_mean(weighted, types == k).mean() for k, name in TYPE_NAMES.items()}
    return sum(parts.values()), parts


# -------------------------------------------------------------------------------------------------
# Stage II: online self-correction (Section 3.3, Eq. 4)


def refinement_loss(logits, refined, mistake_mask):
    """Eq. 4, per draft as the paper writes it: the input is the model's own draft (no masking);
    each draft's cross-entropy against the expert-refined tokens is averaged over its own corrected
    positions N_mistake, and the drafts with a correction are averaged (0 when none has). No 1/t:
    nothing is masked. A garbled draft rewritten whole counts as much as one with a fixed word."""
    ce = token_cross_entropy(logits, refined)                                          # (B, L)
    corrected = mistake_mask.any(dim=1)                                                # (B,)
    if not corrected.any():
        return (ce * 0).sum()  # keeps the graph: every rank calls backward
    return per_row_mean(ce, mistake_mask)[corrected].mean()


# -------------------------------------------------------------------------------------------------
# Samplers (LLaDA's reverse process; Section 3.4 for refinement)


def steps_for(gen_length: int, tokens_per_step: int, num_blocks: int = 1) -> int:
    """The documented rule: steps = ceil(gen_length / tokens_per_step), rounded up to a multiple of
    the number of blocks. When tokens_per_step does not divide gen_length, the transfer schedule
    spreads the remainder, so no step commits more than tokens_per_step tokens (64 tokens at 3 per
    step: 22 steps, twenty of 3 and two of 2)."""
    steps = math.ceil(gen_length / tokens_per_step)
    return math.ceil(steps / num_blocks) * num_blocks


def transfer_schedule(mask_count, steps: int):
    """How many masked tokens to commit at each step of a block, (B, steps): n // steps each, and
    the first n % steps steps one more (100 masks over 32 steps -> 4, 4, 4, 4, 3, 3, ...), as in
    LLaDA."""
    base = mask_count // steps                                                      # (B,)
    extra = mask_count % steps                                                      # (B,)
    step = torch.arange(steps, device=mask_count.device)                            # (steps,)
    return base[:, None] + (step[None, :] < extra[:, None]).long()                  # (B, steps)


def add_gumbel_noise(logits, temperature: float, generator=None):
    """Sampling as an argmax: exp(l) / (-log u)^T, in float64 (low precision makes Gumbel sampling
    worse; LLaDA)."""
    if temperature == 0:
        return logits
    logits = logits.double()
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return logits.exp() / (-torch.log(u)) ** temperature


def chosen_probability(logits, chosen):
    """softmax(logits)[chosen] via log-sum-exp: no softmax tensor is built, only one number per
    position, (B, G).

    In float64, like the reference's softmax: confidences that differ by less than float32 can
    resolve (common in an untrained model) would otherwise tie, and top-k would break the tie
    differently from LLaDA."""
    logits = logits.double()
    return (logits.gather(-1, chosen[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)).exp()


def only_block(logits, ids, start: int, end: int):
    """The logits (B, end - start, V) of positions start..end-1 of ids (B, L), from logits that
    cover all L positions or only the last ones (right-aligned: a logits_fn may skip the prompt)."""
    offset = ids.shape[1] - logits.shape[1]     # positions the logits_fn left out at the front
    if offset > start:
        raise ValueError(f"logits_fn returned logits for the last {logits.shape[1]} positions "
                         f"only, but the block starts at position {start} of {ids.shape[1]}")
    return logits[:, start - offset:end - offset]


def confident_or_best(confidence, candidates, threshold: float):
    """Fast-dLLM's rule: commit every candidate whose confidence >= threshold, and in each row that
    still has a candidate at least the most confident one (so every step makes progress).
    confidence, candidates: (B, Lb)."""
    commit = candidates & (confidence >= threshold)                                 # (B, Lb)
    best = F.one_hot(confidence.argmax(dim=1), confidence.shape[1]).bool()          # (B, Lb)
    return commit | (best & candidates.any(dim=1, keepdim=True))


def first_eot(x, prompt_len: int, eot_id: int):
    """(B,) the position in x (B, L) of each row's first eot_id in its answer (the prompt is never
    searched), or L where the answer holds none."""
    found = x[:, prompt_len:] == eot_id                                       # (B, G)
    first = prompt_len + found.int().argmax(dim=1)    # argmax: the first of equal maxima
    return torch.where(found.any(dim=1), first, x.shape[1])


def commit_most_confident(confidence, candidates, counts):
    """Each row commits its `counts` (B,) most confident candidates, or all of them when it has
    fewer (the official top-k would then also take positions that cannot be committed, the prompt
    included). confidence (B, Lb) is -inf off the candidates (B, Lb)."""
    commit = torch.zeros_like(candidates)
    for row in range(candidates.shape[0]):  # k differs per row
        k = min(int(counts[row]), int(candidates[row].sum()))
        if k > 0:
            commit[row, confidence[row].topk(k).indices] = True
    return commit


class Step(NamedTuple):
    """What denoise_steps yields after each step."""
    block: int              # the block's number
    step: int               # the step's number within the block
    start: int              # the block is x[:, start:end]
    end: int
    x: torch.Tensor         # (B, L) the sequence after the step (live: later steps update it)
    before: torch.Tensor    # (B, end - start) the block before the step
    commit: torch.Tensor    # (B, end - start) the masked positions the step committed


def denoise_steps(predict, x, prompt_len: int, num_blocks: int, steps_per_block: int, mask_id: int,
                  refine: bool = False, threshold: float | None = None, stops=None, on_block=None,
                  threshold_floor: bool = False):
    """The reverse process (LLaDA's sampler; with refine=True ReDiff's, Section 3.4) as a generator:
    x (B, L), the prompt then the answer (masks, or a draft's tokens), is updated in place and a
    Step is yielded after every step.

    The answer is cut into num_blocks blocks, decoded left to right. Each block takes
    steps_per_block steps; step i commits transfer_schedule's i-th share of the block's masked
    positions, the most confident ones (low-confidence remasking). predict(x, start, end) ->
    (x0, confidence), each (B, end - start): the step's prediction of every block position and its
    confidence (step_predictor). Frozen, a committed token never changes. Refining, every position
    of the block that was visible before the step also takes the step's prediction (the same
    logits: no extra forward pass); only masked positions are newly committed.

    Extensions, off by default: threshold (Fast-dLLM: commit every masked position whose confidence
    >= threshold and at least the most confident one, or with threshold_floor the schedule's count,
    until the block holds no mask); stops (a stop rule: which rows run, which positions they may
    commit; NoStop: all); on_block(start), called before each block a row runs (cache rebuilds)."""
    stops = stops or NoStop(x, prompt_len, mask_id)
    block_length = (x.shape[1] - prompt_len) // num_blocks
    for block in range(num_blocks):
        start, end = prompt_len + block * block_length, prompt_len + (block + 1) * block_length
        masks_in_block = (x[:, start:end] == mask_id).sum(dim=1)                         # (B,)
        schedule = transfer_schedule(masks_in_block, steps_per_block)               # (B, steps)
        running = stops.still_running(torch.ones_like(x[:, 0], dtype=torch.bool), x, start, end)
        if not running.any():
            continue  # every row stopped before this block
        if on_block is not None:
            on_block(start)
        for step in itertools.count():
            masked = x[:, start:end] == mask_id                                          # (B, Lb)
            candidates = masked & stops.may_commit(start, end) & running[:, None]        # (B, Lb)
            block_done = step == steps_per_block if threshold is None else not candidates.any()
            if block_done or not running.any():
                break
            x0, confidence = predict(x, start, end)                                      # (B, Lb)
            confidence = torch.where(candidates, confidence, -torch.inf)
            if threshold is None:  # the schedule's count of the most confident masked positions
                commit = commit_most_confident(confidence, candidates, schedule[:, step])
            else:
                commit = confident_or_best(confidence, candidates, threshold)
                if threshold_floor:  # and at least the schedule's count (so <= steps_per_block)
                    commit |= commit_most_confident(confidence, candidates, schedule[:, step])
            before = x[:, start:end].clone()                                             # (B, Lb)
            if refine:  # Section 3.4: every token visible before this step takes its prediction
                x[:, start:end] = torch.where(~masked & running[:, None], x0, before)
            x[:, start:end] = torch.where(commit, x0, x[:, start:end])
            stops.after_step(x)
            yield Step(block, step, start, end, x, before, commit)
            running = stops.still_running(running, x, start, end)


def step_predictor(logits_fn, prompt_len: int, mask_id: int, banned_ids=None,
                   temperature: float = 0.0, remasking: str = "low_confidence",
                   cfg_scale: float = 0.0, generator=None):
    """logits_fn -> denoise_steps' predict(x, start, end) = (x0, confidence), each (B, Lb): LLaDA's
    prediction of each block position, its argmax x0 (after Gumbel noise at temperature > 0), and
    its confidence (remasking "low_confidence": softmax(logits)[x0]; "random": uniform scores).

    banned_ids, and always mask_id, get logit -inf (a trained model never predicts the mask; this
    guarantees that no mask survives). cfg_scale > 0: classifier-free guidance, logits = un +
    (cfg + 1) (cond - un), with the prompt masked for un (LLaDA)."""
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")

    def predict(x, start: int, end: int):
        logits = only_block(logits_fn(x), x, start, end)                            # (B, Lb, V)
        if cfg_scale > 0:
            unprompted = x.clone()
            unprompted[:, :prompt_len] = mask_id                                       # (B, L)
            unconditional = only_block(logits_fn(unprompted), x, start, end)        # (B, Lb, V)
            logits = unconditional + (cfg_scale + 1) * (logits - unconditional)
        never = torch.tensor([*(banned_ids or []), mask_id], device=x.device)
        logits = logits.index_fill(-1, never, -torch.inf)
        x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)          # (B, Lb)
        if remasking == "low_confidence":
            return x0, chosen_probability(logits, x0)
        return x0, torch.rand(x0.shape, generator=generator, device=x0.device)
    return predict


class NoStop:
    """The paper's sampler has no stop rule: every row runs every block, and every masked position
    of the block may be committed. A stop rule (EndOfText, StopRule) changes these answers."""

    def __init__(self, x, prompt_len: int, mask_id: int):
        self.prompt_len, self.mask_id, self.length = prompt_len, mask_id, x.shape[1]
        self.rows, self.device = x.shape[0], x.device

    def still_running(self, running, x, start: int, end: int):
        """running (B,) before a step of the block start..end-1 -> the rows that go on."""
        return running

    def may_commit(self, start: int, end: int):
        """(B, end - start) the positions of the block a step may commit."""
        return torch.ones(self.rows, end - start, dtype=torch.bool, device=self.device)

    def after_step(self, x):
        """Told x (B, L) after every step."""

    def answer(self, x):
        """x (B, L) -> the returned answer (B, G)."""
        return x[:, self.prompt_len:]


class EndOfText(NoStop):
    """generate's stop_id (this project's end-of-text): once every row's answer before a block holds
    stop_id, that block and the later ones are skipped (they cost no forward pass), and the answer
    holds stop_id from each row's first one on."""

    def __init__(self, stop_id: int, x, prompt_len: int, mask_id: int):
        super().__init__(x, prompt_len, mask_id)
        self.stop_id = stop_id

    def still_running(self, running, x, start: int, end: int):
        every_row_ended = (x[:, self.prompt_len:start] == self.stop_id).any(dim=1).all()
        return running & ~every_row_ended

    def answer(self, x):
        answer = x[:, self.prompt_len:]                                                  # (B, G)
        after_stop = (answer == self.stop_id).long().cumsum(dim=1) > 0
        return torch.where(after_stop, self.stop_id, answer)


class StopRule(NoStop):
    """The end-of-turn rule of the official LLaDA-V sampler (generate's eot_id), each row on its
    own.

    After every step, the first eot_id of a row's answer becomes its stop position when it has none
    or this one is earlier (never later, even when a revision replaces that eot_id). Only masked
    positions before the stop can be committed. A row's loop over a block ends once its block holds
    no mask, or once it has a stop and no mask remains in its answer before it; a block that starts
    at or after the stop is skipped. The returned answer holds eot_id from the stop position on."""

    def __init__(self, eot_id: int, x, prompt_len: int, mask_id: int):
        super().__init__(x, prompt_len, mask_id)
        self.eot_id = eot_id
        self.stop = torch.full((x.shape[0],), self.length, device=x.device)  # (B,) L: no stop yet

    def before_stop(self):
        """(B, L) True at the positions before each row's stop position (everywhere without one)."""
        return torch.arange(self.length, device=self.stop.device)[None, :] < self.stop[:, None]

    def still_running(self, running, x, start: int, end: int):
        is_masked = x == self.mask_id                                            # (B, L)
        block_has_mask = is_masked[:, start:end].any(dim=1)                      # (B,)
        # a mask before the stop (for a row without one: anywhere in the answer, e.g. in the block)
        answer_before_stop = self.before_stop()[:, self.prompt_len:]             # (B, G)
        mask_before_stop = (is_masked[:, self.prompt_len:] & answer_before_stop).any(dim=1)
        return running & block_has_mask & mask_before_stop & (start < self.stop)

    def may_commit(self, start: int, end: int):
        return self.before_stop()[:, start:end]

    def after_step(self, x):
        """The stop positions after a step: the first eot_id of each answer, if it is earlier."""
        self.stop = torch.minimum(self.stop, first_eot(x, self.prompt_len, self.eot_id))

    def answer(self, x):
        """x (B, L) -> the returned answer (B, G): eot_id from each row's stop position on."""
        answer = x[:, self.prompt_len:]
        return torch.where(self.before_stop()[:, self.prompt_len:], answer, self.eot_id)


def trace_entry(step: Step, prompt_len: int, mask_id: int) -> dict:
    """One step of the refinement trace (the paper's Figure 4), placed in the answer: block, step,
    ids (B, G) after the step, new (B, G) the positions it committed, changed (B, G) the visible
    tokens it revised."""
    new = torch.zeros_like(step.x[:, prompt_len:], dtype=torch.bool)                    # (B, G)
    changed = torch.zeros_like(new)
    block = slice(step.start - prompt_len, step.end - prompt_len)
    new[:, block] = step.commit
    changed[:, block] = (step.before != mask_id) & (step.x[:, step.start:step.end] != step.before)
    return {"block": step.block, "step": step.step, "ids": step.x[:, prompt_len:].clone(),
            "new": new, "changed": changed}


@torch.no_grad()
def generate(logits_fn, prompt, gen_length: int, steps: int, block_length: int | None = None,
             temperature: float = 0.0, refine: bool = False, mask_id: int = 126336,
             remasking: str = "low_confidence", cfg_scale: float = 0.0, stop_id: int | None = None,
             banned_ids=None, draft=None, return_trace: bool = False, generator=None,
             threshold: float | None = None, on_block=None, eot_id: int | None = None,
             threshold_floor: bool = False):
    """Caption by the reverse process: start from an all-[MASK] answer and commit the most confident
    tokens, block by block (denoise_steps). Frozen (refine=False) it is LLaDA's `generate`, token
    for token at T = 0 with the options below off; refining (refine=True) it is ReDiff's sampler.

    logits_fn: any callable (B, L) ids -> (B, L, V) logits, or the logits of only the last L'
    positions (B, L', V) with L' >= L - the current block's start (model.ModelLogits skips the
    prompt). prompt: (B, P) ids. steps: over all blocks, a multiple of their number. Returns the
    answer ids (B, G), and with return_trace=True also one trace_entry per step.

    - temperature, remasking, cfg_scale, banned_ids: how a step predicts (step_predictor).
    - threshold, threshold_floor, on_block: denoise_steps'.
    - stop_id: once every row's finished blocks hold stop_id, the remaining blocks are skipped and
      the answer holds stop_id from each row's first one on (EndOfText).
    - eot_id: the official LLaDA-V sampler's end of turn, each row on its own (StopRule). Refining
      revises every visible position of the block, after the stop too, while the row runs. Not with
      stop_id.
    - draft (B, G) (Figure 6): an initial answer whose non-mask tokens start visible, not masked."""
    B, P = prompt.shape
    if eot_id is not None and stop_id is not None:
        raise ValueError("eot_id is a stop rule of its own: it does not take stop_id")
    block_length = block_length or gen_length
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length "
                         f"{block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks}")

    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)  # (B, L)
    x[:, :P] = prompt
    if draft is not None:
        x[:, P:] = draft
    if eot_id is not None:
        stops = StopRule(eot_id, x, P, mask_id)
    elif stop_id is not None:
        stops = EndOfText(stop_id, x, P, mask_id)
    else:
        stops = NoStop(x, P, mask_id)
    predict = step_predictor(logits_fn, P, mask_id, banned_ids, temperature, remasking, cfg_scale,
                             generator)
    steps_run = denoise_steps(predict, x, P, num_blocks, steps // num_blocks, mask_id, refine,
                              threshold, stops, on_block, threshold_floor)
    trace = [trace_entry(step, P, mask_id) for step in steps_run if return_trace]  # runs every step
    answer = stops.answer(x)
    return (answer, trace) if return_trace else answer
