"""tests/test_rediff.py: hand-computed checks of masking, Eq. 1-4, corruption and both samplers."""
import math

import pytest
import torch
import torch.nn.functional as F

import rediff
from tests.llada_reference import reference_generate

V, MASK = 12, 11  # a toy vocabulary whose last id is the mask


class MockModel:
    """A context-dependent stand-in for a mask predictor: logits mix each token with the mean of the sequence."""

    def __init__(self, seed=0, vocab=V, width=16, max_len=64):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, width, generator=g)
        self.pos = torch.randn(max_len, width, generator=g)
        self.out = torch.randn(width, vocab, generator=g)
        self.calls = 0
        self.never_mask = torch.zeros(vocab)
        self.never_mask[MASK] = -1e4   # like a trained model, the mock never predicts the mask itself

    def __call__(self, ids):
        self.calls += 1
        h = self.emb[ids] + self.pos[: ids.shape[1]] + 2 * self.emb[ids].mean(dim=1, keepdim=True)
        return h @ self.out + self.never_mask


# ---------------------------------------------------------------------------------------------------- masking, Eq. 1

def test_forward_mask_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(4000, 40, dtype=torch.long)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 10:] = True
    noisy, masked, p = rediff.forward_mask(ids, answer, MASK, generator=g)
    assert not masked[:, :10].any(), "the prompt is never masked"
    assert torch.equal(noisy == MASK, masked)
    assert p.min() >= rediff.MASK_EPS and p.max() <= 1
    assert abs(p.mean().item() - 0.5) < 0.02                       # t ~ U(0, 1)
    rate = masked[:, 10:].float().mean(dim=1)                       # per-sample masked fraction tracks p
    assert (rate - p).abs().mean() < 0.08
    assert abs(masked[:, 10:].float().mean().item() - p.mean().item()) < 0.01


def test_masked_diffusion_loss_hand_example():
    logits = torch.zeros(1, 4, 3)
    logits[0, 2] = torch.tensor([math.log(3.0), 0.0, 0.0])       # p(target 0) = 3/5 at position 2
    targets = torch.tensor([[0, 0, 0, 1]])
    masked = torch.tensor([[False, False, True, True]])
    answer = torch.tensor([[False, True, True, True]])             # answer length 3
    p = torch.tensor([0.5])
    expected = (-math.log(3 / 5) + -math.log(1 / 3)) / 0.5 / 3
    assert rediff.masked_diffusion_loss(logits, targets, masked, p, answer).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- Stage I

def test_typed_losses_hand_example_with_empty_type():
    logits = torch.zeros(2, 3, 4)                                  # uniform: every CE is log 4
    logits[1, 0, 2] = math.log(5.0)                                # p(2) = 5/8 at (1, 0)
    labels = torch.tensor([[0, 1, 2], [2, 3, 0]])
    types = torch.tensor([[rediff.IGNORE, rediff.MASK, rediff.CLEAN], [rediff.MASK, rediff.SYNTAX, rediff.CLEAN]])
    p = torch.tensor([0.5, 0.25])
    total, parts = rediff.typed_losses(logits, labels, types, p)
    ce_mask_0, ce_mask_1 = math.log(4) / 0.5, -math.log(5 / 8) / 0.25
    assert parts["mask"].item() == pytest.approx((ce_mask_0 + ce_mask_1) / 2, rel=1e-6)
    assert parts["syntax"].item() == pytest.approx((0 + math.log(4) / 0.25) / 2, rel=1e-6)  # row 0 has none
    assert parts["clean"].item() == pytest.approx((math.log(4) / 0.5 + math.log(4) / 0.25) / 2, rel=1e-6)
    assert parts["hallucination"].item() == 0.0                     # empty type contributes 0
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)


def test_typed_losses_are_per_row_means_not_pooled_counts():
    """Eq. 2-3 put 1/N_type inside the expectation over samples: each row's own count, then the mean of rows.
    Row 0 has two syntax tokens, row 1 one; pooling the three would give (a + b + c) / 3 instead."""
    logits = torch.zeros(2, 3, 4)                                  # uniform: CE log 4 unless set
    logits[0, 0, 1] = math.log(3.0)                                # p(1) = 3/6 at (0, 0)
    logits[1, 2, 2] = math.log(9.0)                                # p(2) = 9/12 at (1, 2)
    labels = torch.tensor([[1, 0, 3], [0, 0, 2]])
    types = torch.full((2, 3), rediff.SYNTAX)
    types[0, 2] = types[1, 0] = types[1, 1] = rediff.IGNORE        # row 0: positions 0, 1; row 1: position 2
    p = torch.tensor([0.5, 0.25])
    a, b, c = -math.log(3 / 6) / 0.5, math.log(4) / 0.5, -math.log(9 / 12) / 0.25
    total, parts = rediff.typed_losses(logits, labels, types, p)
    assert parts["syntax"].item() == pytest.approx(((a + b) / 2 + c) / 2, rel=1e-6)
    assert abs(parts["syntax"].item() - (a + b + c) / 3) > 0.1, "the pooled answer differs on this batch"
    assert total.item() == pytest.approx(parts["syntax"].item(), rel=1e-6)


def test_hallucination_rows_have_loss_only_on_the_altered_span():
    ids = torch.tensor([[9, 1, 2, 3, 4], [9, 1, 2, 3, 4]])          # position 0 is the prompt
    answer = torch.tensor([[False, True, True, True, True]] * 2)
    wrong = ids.clone()
    wrong[0, 2:4] = torch.tensor([5, 3])                           # row 0: span 2..3, only position 2 altered
    span = torch.zeros_like(answer)
    span[0, 2:4] = True
    g = torch.Generator().manual_seed(0)
    inputs, labels, types, p = rediff.corrupt_for_revision(ids, answer, MASK, [1, 2, 3, 4], replace_prob=0.5,
                                                           generator=g)
    h_inputs, h_types, h_p = rediff.hallucination_rows(ids, answer, wrong, span, inputs, types, p)
    assert h_inputs[0].tolist() == [9, 1, 5, 3, 4], "the whole altered caption is visible: no mask, no replacement"
    assert h_types[0].tolist() == [rediff.IGNORE, rediff.IGNORE, rediff.HALLUCINATION, rediff.IGNORE, rediff.IGNORE]
    assert h_p[0].item() == 1.0, "no 1/t: nothing is masked"
    assert torch.equal(h_inputs[1], inputs[1]) and torch.equal(h_types[1], types[1]) and h_p[1] == p[1]
    logits = torch.randn(2, 5, 10, requires_grad=True)
    total, parts = rediff.typed_losses(logits, labels, h_types, h_p)
    (grad,) = torch.autograd.grad(parts["hallucination"], logits)
    assert grad[0, 2].abs().sum() > 0 and grad[0, [0, 1, 3, 4]].abs().sum() == 0 and grad[1].abs().sum() == 0


def test_corruption_statistics_and_labels():
    g = torch.Generator().manual_seed(1)
    B, L, P = 3000, 30, 6
    ids = torch.randint(0, 8, (B, L), generator=g)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, P:] = True
    ordinary = list(range(0, 8))                                    # ids 8.. are "special" here
    inputs, labels, types, p = rediff.corrupt_for_revision(ids, answer, MASK, ordinary, replace_prob=0.1, generator=g)
    assert torch.equal(labels, ids), "labels are always the clean ids"
    assert torch.equal(inputs[:, :P], ids[:, :P]) and (types[:, :P] == rediff.IGNORE).all(), "prompt untouched"
    assert torch.equal(inputs == MASK, types == rediff.MASK)
    syntax = types == rediff.SYNTAX
    visible = (types == rediff.SYNTAX) | (types == rediff.CLEAN)
    assert abs(syntax.sum().item() / visible.sum().item() - 0.1) < 0.01
    assert (inputs[syntax] < 8).all(), "replacements come from the ordinary vocabulary only"
    assert torch.equal(inputs[types == rediff.CLEAN], ids[types == rediff.CLEAN])


def test_t_dependent_rate_and_hallucination_span():
    p = torch.tensor([0.02, 0.5])
    assert torch.allclose(rediff.replacement_rate(p, 0.1, t_dependent=True), torch.tensor([0.02, 0.1]))
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]] * 2000)
    wrong = ids.clone()
    wrong[:, 3] = 7
    span = torch.zeros_like(ids, dtype=torch.bool)
    span[:, 3] = True
    answer = torch.ones_like(span)
    answer[:, 0] = False
    inputs, labels, types, _ = rediff.corrupt_for_revision(ids, answer, MASK, [1, 2], replace_prob=0.0,
                                                           wrong_ids=wrong, wrong_span=span, generator=g)
    hall = types == rediff.HALLUCINATION
    assert hall.any() and hall[:, 3].sum() == hall.sum(), "only the span can be hallucinated"
    assert (inputs[hall] == 7).all() and (labels[hall] == 4).all(), "input holds the wrong token, label the right one"
    assert torch.equal(hall[:, 3], types[:, 3] != rediff.MASK)


def test_refinement_loss_eq4():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 3] = math.log(2.0)                                 # p(3) = 2/5
    refined = torch.tensor([[0, 3, 1]])
    mistakes = torch.tensor([[False, True, True]])
    expected = (-math.log(2 / 5) + math.log(4.0)) / 2
    assert rediff.refinement_loss(logits, refined, mistakes).item() == pytest.approx(expected, rel=1e-6)
    assert rediff.refinement_loss(logits, refined, torch.zeros_like(mistakes)).item() == 0.0


def test_refinement_loss_is_a_mean_over_drafts_each_its_own_mean():
    """Eq. 4 puts 1/N_mistake inside the expectation over drafts: a draft with three corrected tokens weighs as
    much as one with a single corrected token; a draft without corrections is left out of the mean."""
    logits = torch.zeros(3, 4, 5)                                   # uniform: CE log 5 unless set
    logits[1, 0, 2] = math.log(6.0)                                 # p(2) = 6/10 at (1, 0)
    refined = torch.tensor([[0, 1, 2, 3], [2, 0, 0, 0], [1, 1, 1, 1]])
    mistakes = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    a, b = math.log(5), -math.log(6 / 10)
    loss = rediff.refinement_loss(logits, refined, mistakes).item()
    assert loss == pytest.approx((a + b) / 2, rel=1e-6)
    assert abs(loss - (3 * a + b) / 4) > 0.1, "the pooled count gives another answer on this batch"


# ---------------------------------------------------------------------------------------------------- samplers

def test_transfer_schedule_matches_llada():
    schedule = rediff.transfer_schedule(torch.tensor([100, 7, 0]), 32)
    assert schedule[0].tolist()[:6] == [4, 4, 4, 4, 3, 3] and schedule[0].sum() == 100
    assert schedule[1].tolist() == [1] * 7 + [0] * 25
    assert schedule[2].sum() == 0


@pytest.mark.parametrize("gen,steps,block", [(16, 16, None), (16, 4, None), (16, 8, 8), (12, 5, None), (16, 6, 4)])
def test_sampler_commits_k_per_step_and_leaves_no_mask(gen, steps, block):
    if block is not None and steps % (gen // block):
        steps = (gen // block) * 2
    model = MockModel()
    prompt = torch.randint(0, 8, (3, 5))
    out, trace = rediff.generate(model, prompt, gen, steps, block_length=block, mask_id=MASK, return_trace=True)
    assert out.shape == (3, gen) and not (out == MASK).any()
    blocks = gen // (block or gen)
    per_block = rediff.transfer_schedule(torch.tensor([block or gen]), steps // blocks)[0].tolist() * blocks
    assert [int(t["new"][0].sum()) for t in trace] == per_block
    assert not any(t["changed"].any() for t in trace), "the frozen sampler never revises"
    assert torch.equal(trace[-1]["ids"], out)
    assert model.calls == steps


@pytest.mark.parametrize("gen,steps,block,cfg", [(16, 16, 16, 0.0), (16, 4, 16, 0.0), (24, 12, 8, 0.0), (16, 8, 8, 1.5)])
def test_frozen_sampler_matches_llada_reference(gen, steps, block, cfg):
    model = MockModel(seed=3)
    prompt = torch.randint(0, 8, (4, 6), generator=torch.Generator().manual_seed(4))
    ours = rediff.generate(model, prompt, gen, steps, block_length=block, mask_id=MASK, cfg_scale=cfg)
    reference = reference_generate(model, prompt, gen, steps, block, MASK, cfg_scale=cfg)
    assert torch.equal(ours, reference)


def test_refine_overwrites_visible_tokens_when_logits_change():
    # Logits that prefer token 1 everywhere while few tokens are visible, token 2 once the context fills up.
    def logits_fn(ids):
        filled = (ids[:, 2:] != MASK).float().mean(dim=1, keepdim=True)      # (B, 1)
        logits = torch.zeros(*ids.shape, V)
        logits[..., 1] = 1 - filled
        logits[..., 2] = filled
        return logits
    prompt = torch.zeros(1, 2, dtype=torch.long)
    frozen = rediff.generate(logits_fn, prompt, 8, 8, mask_id=MASK)
    refined, trace = rediff.generate(logits_fn, prompt, 8, 8, mask_id=MASK, refine=True, return_trace=True)
    assert (frozen == 1).sum() > 0, "frozen keeps the early tokens"
    assert (refined == 2).all(), "refining rewrites them once the context changes the prediction"
    assert any(t["changed"].any() for t in trace)
    revised_at_step = [int(t["changed"].sum()) for t in trace]
    assert sum(revised_at_step) >= 1


def test_refine_costs_no_extra_forward_pass_and_trace_agrees():
    prompt = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(5))
    a, b = MockModel(seed=7), MockModel(seed=7)
    frozen = rediff.generate(a, prompt, 16, 8, mask_id=MASK)
    refined, trace = rediff.generate(b, prompt, 16, 8, mask_id=MASK, refine=True, return_trace=True)
    assert a.calls == b.calls == 8
    assert torch.equal(trace[-1]["ids"], refined)
    x = torch.full((2, 16), MASK)  # replaying new + changed tokens reproduces every snapshot
    for t in trace:
        touched = t["new"] | t["changed"]
        assert not (t["new"] & (x != MASK)).any(), "only masked positions are newly committed"
        x = torch.where(touched, t["ids"], x)
        assert torch.equal(x, t["ids"])
    assert frozen.shape == refined.shape


def test_banned_ids_stop_id_and_draft():
    model = MockModel(seed=9)
    prompt = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(6))
    out = rediff.generate(model, prompt, 12, 12, mask_id=MASK, banned_ids=[0, 1, 2], refine=True)
    assert not torch.isin(out, torch.tensor([0, 1, 2, MASK])).any()
    stop = int(rediff.generate(model, prompt, 12, 12, mask_id=MASK)[0, 3])
    out = rediff.generate(model, prompt, 12, 12, mask_id=MASK, stop_id=stop)
    first = (out[0] == stop).nonzero()[0, 0]
    assert (out[0, first:] == stop).all()
    draft = torch.full((2, 12), MASK)
    draft[:, :3] = 5
    frozen = rediff.generate(model, prompt, 12, 9, mask_id=MASK, draft=draft)
    assert (frozen[:, :3] == 5).all(), "a frozen sampler keeps the draft's visible tokens"


def test_temperature_sampling_is_seeded():
    model = MockModel(seed=11)
    prompt = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(6))
    run = lambda s: rediff.generate(model, prompt, 8, 4, mask_id=MASK, temperature=1.0,  # noqa: E731
                                    generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(0), run(0))
    assert not (run(0) == MASK).any()


def test_chosen_probability_equals_float64_softmax():
    logits = torch.randn(3, 7, 50) * 4
    chosen = logits.argmax(-1)
    reference = torch.softmax(logits.double(), -1).gather(-1, chosen[..., None]).squeeze(-1)
    assert torch.allclose(rediff.chosen_probability(logits, chosen).double(), reference, atol=1e-6)


def test_caption_steps_counts_the_steps_that_wrote_the_caption():
    """tools.eval.caption_steps on a real sampler run: end-of-text is the surest token, so
    low-confidence decoding commits the padding first and a 3-word caption in an 8-token answer is
    written in the last 2 of 4 steps."""
    from tools.eval import caption_steps
    EOS, G = 1, 8
    where = torch.arange(G, dtype=torch.float)                                      # (G,) answer positions

    def logits_fn(ids):                                                             # (2, 2 + G) -> (2, 2 + G, V)
        logits = torch.zeros(ids.shape[0], ids.shape[1], V)
        logits[0, 2:5, 3] = 5 + where[:3]        # row 0: words at positions 0-2 (confidence rising with position)
        logits[0, 5:, EOS] = 10 + where[3:]      # then end-of-text, surer still: committed first, from the end
        logits[1, 2:, 4] = 5 + where             # row 1: a caption that fills the whole answer
        return logits

    prompt = torch.zeros(2, 2, dtype=torch.long)
    for refine in (False, True):
        ids, trace = rediff.generate(logits_fn, prompt, G, steps=4, refine=refine, mask_id=MASK, return_trace=True)
        assert ids[0].tolist() == [3, 3, 3] + [EOS] * 5 and ids[1].tolist() == [4] * G
        assert [entry["new"][0].nonzero().flatten().tolist() for entry in trace] == [[6, 7], [4, 5], [2, 3], [0, 1]]
        assert caption_steps(trace, ids, EOS).tolist() == [2, 4]
