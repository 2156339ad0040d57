"""tests/test_sampler_stop.py: rediff.generate's end-of-turn stop rule (eot_id) against a plain,
row-by-row restatement of the official LLaDA-V sampler's rules, on a deterministic mock model."""
import pytest
import torch

import rediff

V = 14                   # toy vocabulary: 0..9 ordinary words, then the special ids below
BANNED = (10, 11)        # stand-ins for <|endoftext|>, <|startoftext|> and the header ids
EOT = 12                 # stand-in for <|eot_id|>
MASK = 13
PROMPT = [[1, EOT, 10, 11, 3], [4, 11, EOT, 2, 10], [EOT, EOT, 5, 10, 0], [7, 8, 9, 11, EOT]]
P = len(PROMPT[0])
CONTEXTS = 7             # the mock's logits see the whole sequence through one of this many values


class TableModel:
    """A deterministic mock: the logits at position j are table[j, token at j] + context[c, j],
    where c is a weighted sum of the whole sequence (prompt, answer and masks) modulo CONTEXTS, so
    every commit can change every prediction and revisions happen. Biases on the eot and banned
    columns make them likely. answer_only: logits of the answer positions only (right-aligned)."""

    def __init__(self, seed: int, length: int, eot_bias: float, answer_only: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(length, V, V, generator=g)                   # (L, V, V)
        self.context = torch.randn(CONTEXTS, length, V, generator=g)          # (C, L, V)
        self.table[..., EOT] += eot_bias
        self.table[..., list(BANNED)] += 0.5
        self.weights = torch.randint(1, 5, (length,), generator=g)            # (L,)
        self.skip = P if answer_only else 0
        self.calls = 0

    def __call__(self, ids):
        self.calls += 1
        L = ids.shape[1]
        c = (ids * self.weights[:L]).sum(dim=1) % CONTEXTS                     # (B,)
        logits = self.table[torch.arange(L)[None, :], ids] + self.context[c, :L]  # (B, L, V)
        return logits[:, self.skip:]


def plain_stop_rule(model, prompt, gen_length, steps, block_length, refine, threshold=None):
    """The rules, restated for one row with python lists. Returns (answer, the answer after every
    step, steps run in each block, events seen)."""
    x = list(prompt) + [MASK] * gen_length
    stop = None                                  # the row's stop position in x
    states, steps_in_block = [], []
    events = {"stopped": False, "eot_revised_away": False, "revised_after_stop": False,
              "skipped_block": False, "left_block_early": False}
    per_block = steps // (gen_length // block_length)
    for s in range(P, P + gen_length, block_length):
        e = s + block_length
        steps_in_block.append(0)
        if stop is not None and s >= stop:
            events["skipped_block"] = True
            continue
        n = x[s:e].count(MASK)
        schedule = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        i = 0
        while threshold is not None or i < per_block:
            if MASK not in x[s:e]:
                break
            if stop is not None and MASK not in x[P:stop]:
                break
            logits = model(torch.tensor([x]))[0]
            offset = len(x) - logits.shape[0]          # right-aligned logits: the last positions
            guess, confidence = {}, {}
            for j in range(s, e):
                row = logits[j - offset].clone()
                row[list(BANNED) + [MASK]] = -float("inf")
                guess[j] = int(row.argmax())
                confidence[j] = float(torch.softmax(row.double(), dim=0)[guess[j]])
            candidates = [j for j in range(s, e) if x[j] == MASK and (stop is None or j < stop)]
            ranked = sorted(candidates, key=lambda j: -confidence[j])
            if threshold is None:
                chosen = ranked[:min(schedule[i], len(candidates))]
            else:
                chosen = [j for j in ranked if confidence[j] >= threshold] or ranked[:1]
            new = list(x)
            if refine:
                for j in range(s, e):
                    if x[j] != MASK:
                        new[j] = guess[j]
                        if stop is not None and j >= stop and new[j] != x[j]:
                            events["revised_after_stop"] = True
            for j in chosen:
                new[j] = guess[j]
            if stop is not None and x[stop] == EOT and new[stop] != EOT:
                events["eot_revised_away"] = True
            x = new
            for j in range(P, len(x)):
                if x[j] == EOT:
                    if stop is None or j < stop:
                        stop = j
                        events["stopped"] = True
                    break
            states.append(x[P:])
            steps_in_block[-1] += 1
            i += 1
        if threshold is None and i < per_block:
            events["left_block_early"] = True
    answer = x[P:] if stop is None else x[P:stop] + [EOT] * (len(x) - stop)
    return answer, states, steps_in_block, events


def run_both(seed, gen_length, steps, block_length, refine, eot_bias, rows=4, threshold=None,
             answer_only=False):
    """rediff.generate on `rows` prompts at once, and the plain rules row by row: checks that they
    agree (answers, forward passes; with one row every step) and returns the events, one per row."""
    def make():
        return TableModel(seed, P + gen_length, eot_bias, answer_only)

    model = make()
    ours, trace = rediff.generate(model, torch.tensor(PROMPT[:rows]), gen_length, steps,
                                  block_length=block_length, refine=refine, mask_id=MASK,
                                  banned_ids=BANNED, eot_id=EOT, return_trace=True,
                                  threshold=threshold)
    events, per_row_steps = [], []
    for r in range(rows):
        answer, states, steps_in_block, seen = plain_stop_rule(make(), PROMPT[r], gen_length, steps,
                                                               block_length, refine, threshold)
        assert ours[r].tolist() == answer, f"row {r}"
        per_row_steps.append(steps_in_block)
        events.append(seen)
        if rows == 1:  # one row: every intermediate state too, masks included
            assert [t["ids"][0].tolist() for t in trace] == states
    assert model.calls == sum(max(col) for col in zip(*per_row_steps))  # a pass while a row runs
    check_no_commit_at_or_after_stop(trace, gen_length)
    assert not set(BANNED + (MASK,)) & set(ours.flatten().tolist())
    return events


def check_no_commit_at_or_after_stop(trace, gen_length):
    """From the trace alone: no step commits a position at or after the row's stop position as it
    stood before that step (the first eot of the answers of earlier steps, never moving later)."""
    stop = None
    for entry in trace:
        if stop is not None:
            after = torch.arange(gen_length)[None, :] >= stop[:, None]      # (B, G)
            assert not (entry["new"] & after).any()
        found = entry["ids"] == EOT                                         # (B, G)
        first = torch.where(found.any(dim=1), found.int().argmax(dim=1), gen_length)
        stop = first if stop is None else torch.minimum(stop, first)


def seen(events, name):
    return [e[name] for e in events]


# ------------------------------------------------------------------------------------------------
# Against the plain rules


@pytest.mark.parametrize("refine", [False, True])
def test_one_block_rows_with_and_without_a_stop(refine):
    events = []
    for seed in range(4):
        events += run_both(seed, gen_length=12, steps=4, block_length=12, refine=refine,
                           eot_bias=0.0)
    assert any(seen(events, "stopped")) and not all(seen(events, "stopped"))
    assert any(seen(events, "left_block_early"))  # no mask left before the stop: fewer steps
    if refine:  # an eot that a later revision replaces (the stop stays); revisions after the stop
        assert any(seen(events, "eot_revised_away")) and any(seen(events, "revised_after_stop"))


@pytest.mark.parametrize("refine", [False, True])
def test_several_blocks_skip_the_blocks_after_the_stop(refine):
    events = []
    for seed in range(4):
        events += run_both(seed, gen_length=16, steps=8, block_length=4, refine=refine,
                           eot_bias=-0.5)
    assert any(seen(events, "stopped")) and not all(seen(events, "stopped"))
    assert any(seen(events, "skipped_block"))


@pytest.mark.parametrize("refine", [False, True])
def test_more_steps_per_block_than_the_block_holds(refine):
    """6 steps over blocks of 4: the schedule ends in zeros, and a row leaves its block once the
    block holds no mask (frozen, nothing would change; refining, it would revise on)."""
    for seed in range(3):
        events = run_both(seed, gen_length=8, steps=12, block_length=4, refine=refine,
                          eot_bias=0.0)
        assert all(seen(events, "left_block_early"))


@pytest.mark.parametrize("refine", [False, True])
def test_one_row_every_intermediate_state(refine):
    for seed in range(4):
        run_both(seed, gen_length=8, steps=4, block_length=4, refine=refine, eot_bias=0.5, rows=1)


def test_right_aligned_logits_and_the_threshold_rule():
    for seed in range(3):
        run_both(seed, gen_length=12, steps=6, block_length=6, refine=True, eot_bias=0.5,
                 answer_only=True)
        run_both(seed, gen_length=12, steps=6, block_length=6, refine=True, eot_bias=0.5,
                 threshold=0.3)


# ------------------------------------------------------------------------------------------------
# Against the plain sampler


@pytest.mark.parametrize("refine", [False, True])
def test_an_eot_the_model_never_predicts_changes_nothing(refine):
    """With steps <= block length every step commits, so a row leaves a block only when the
    schedule ends: eot_id then only adds its checks, and the answer is the plain sampler's."""
    model = TableModel(0, P + 12, eot_bias=-1e4)
    prompt = torch.tensor(PROMPT)
    plain = rediff.generate(model, prompt, 12, 6, block_length=4, refine=refine, mask_id=MASK,
                            banned_ids=BANNED)
    ours = rediff.generate(model, prompt, 12, 6, block_length=4, refine=refine, mask_id=MASK,
                           banned_ids=BANNED, eot_id=EOT)
    assert torch.equal(plain, ours) and EOT not in ours.tolist()


def test_eot_id_does_not_take_stop_id():
    model = TableModel(0, P + 4, eot_bias=0.0)
    prompt = torch.tensor(PROMPT[:1])
    with pytest.raises(ValueError, match="eot_id"):
        rediff.generate(model, prompt, 4, 4, mask_id=MASK, eot_id=EOT, stop_id=EOT)
