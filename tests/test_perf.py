"""tests/test_perf.py: the fast paths give the same answers as the plain ones: partial logits, the prefix cache
(exact when rebuilt every step, or always with the Prefix-DLM mask), confidence-threshold decoding (Fast-dLLM), and
tools/bench.py --quick end to end.
Nothing here is timed: speed is tools/bench.py's job."""
import pytest
import torch

import rediff
import shapes_train
from model import LMConfig, ModelLogits, VisionConfig, VLM, VLMConfig
from sample import caption_images

V, MASK = 12, 11  # a toy vocabulary whose last id is the mask


def tiny_vlm(n_kv_heads=None, image_size=48, prefix_dlm_len=0):
    torch.manual_seed(0)
    cfg = VLMConfig(lm=LMConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                                mlp_hidden=64),
                    vision=VisionConfig(image_size=image_size, patch_size=16, width=32, layers=1, heads=2),
                    image_token_id=4, prefix_dlm_len=prefix_dlm_len)
    return VLM(cfg).eval()


class Tokenizer:
    """The few fields caption_images needs: 9 image placeholders (id 4) and "describe the image ." as ids 5-8."""
    image_id, mask_id, eos_id, special_ids = 4, 1, 2, [0, 1, 2, 3, 4]

    def encode(self, text):
        return [5, 6, 7, 8]


def prompt_and_answer(model, batch=2, answer=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([4] * model.n_image_tokens + [5, 6, 7, 8]).expand(batch, -1)            # (B, P)
    return torch.cat([prompt, torch.randint(5, 20, (batch, answer), generator=g)], dim=1), prompt.shape[1]


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_partial_logits_and_prefix_cache_equal_the_full_forward(n_kv_heads):
    model = tiny_vlm(n_kv_heads)
    ids, P = prompt_and_answer(model)
    embeds = model.encode_images(torch.randn(2, 3, 48, 48))
    with torch.no_grad():
        full = model(ids, embeds)                                                                  # (B, L, V)
        partial = model(ids, embeds, logits_from=P)                                                # (B, G, V)
        first, kv = model(ids, embeds, keep_kv=P, logits_from=P)
        cached = model(ids[:, P:], past_kv=kv)                      # the answer alone, attending to the cached prefix
    assert partial.shape == cached.shape == (2, ids.shape[1] - P, 20)
    assert len(kv) == 2 and kv[0][0].shape == (2, n_kv_heads or 4, P, 8)
    torch.testing.assert_close(partial, full[:, P:], rtol=0, atol=1e-5)
    torch.testing.assert_close(first, full[:, P:], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, full[:, P:], rtol=0, atol=1e-5)
    changed = ids.clone()
    changed[:, P:] = 5                                                  # the answer moves on, the cache does not
    stale = model(changed[:, P:], past_kv=kv)
    assert not torch.allclose(stale, model(changed, embeds)[:, P:], atol=1e-5), "a stale cache is an approximation"


def test_prefix_dlm_prefix_ignores_the_answer_and_the_answer_sees_everything():
    P = 9 + 4
    model, plain = tiny_vlm(prefix_dlm_len=P), tiny_vlm()                  # the same weights (seed 0), two masks
    ids, _ = prompt_and_answer(model)
    embeds = model.encode_images(torch.randn(2, 3, 48, 48))
    changed = ids.clone()
    changed[:, P:] = 5
    with torch.no_grad():
        _, kv = model(ids, embeds, keep_kv=P)
        _, kv_changed = model(changed, embeds, keep_kv=P)
        _, kv_prefix_alone = plain(ids[:, :P], embeds, keep_kv=P)          # the prefix with no answer at all
        logits, changed_logits = model(ids, embeds), model(changed, embeds)
    for (k, v), (k2, v2), (k3, v3) in zip(kv, kv_changed, kv_prefix_alone):
        torch.testing.assert_close(k, k2, rtol=0, atol=0)                  # the answer cannot reach the prefix
        torch.testing.assert_close(v, v3, rtol=0, atol=1e-5)               # = a bidirectional pass over the prefix
    assert not torch.allclose(logits[:, P:], changed_logits[:, P:]), "answer positions still see the answer"


def test_prefix_dlm_makes_the_prefix_cache_exact():
    model, tok = tiny_vlm(prefix_dlm_len=9 + 4), Tokenizer()
    images = torch.randn(3, 3, 48, 48)
    for refine in (False, True):
        plain, passes = caption_images(model, tok, images, 12, 1, refine=refine)    # one block, 12 steps
        cached, cached_passes = caption_images(model, tok, images, 12, 1, refine=refine, prefix_cache=True)
        assert torch.equal(plain, cached) and passes == cached_passes == 12


def test_prefix_cache_built_at_each_block_matches_the_sampler_and_counts_builds():
    model, tok = tiny_vlm(), Tokenizer()
    images = torch.randn(3, 3, 48, 48)
    for refine in (False, True):  # blocks of one step: the cache is fresh at every step, so exact
        plain, passes = caption_images(model, tok, images, 12, 2, refine=refine, block_length=2)
        exact, exact_passes = caption_images(model, tok, images, 12, 2, refine=refine,
                                             block_length=2, prefix_cache=True)
        assert torch.equal(plain, exact) and passes == exact_passes == 6
        cached, _ = caption_images(model, tok, images, 12, 2, refine=refine, prefix_cache=True)
        assert cached.shape == (3, 12) and not (cached == tok.mask_id).any()
    embeds = model.encode_images(images)
    P = model.n_image_tokens + 4
    prompt = torch.tensor([4] * 9 + [5, 6, 7, 8]).expand(3, -1)
    fn = ModelLogits(model, embeds, P, prefix_cache=True)  # 3 blocks of 4 steps: a build a block
    rediff.generate(fn, prompt, 12, 12, block_length=4, mask_id=tok.mask_id,
                    on_block=fn.begin_block)
    assert (fn.forward_passes, fn.cache_builds) == (12, 3)


def test_image_features_once_per_caption_and_refinement_reuses_the_step():
    model, tok = tiny_vlm(), Tokenizer()
    calls = {"vision": 0, "lm": 0}
    tower, lm = model.vision_tower.forward, model.lm.forward
    model.vision_tower.forward = lambda *a, **k: calls.__setitem__("vision", calls["vision"] + 1) or tower(*a, **k)
    model.lm.forward = lambda *a, **k: calls.__setitem__("lm", calls["lm"] + 1) or lm(*a, **k)
    for cache in (False, True):
        calls.update(vision=0, lm=0)
        _, passes = caption_images(model, tok, torch.randn(2, 3, 48, 48), 12, 3, refine=True, prefix_cache=cache)
        assert calls == {"vision": 1, "lm": 4} and passes == 4, "one tower pass a caption, one LM pass a step"


def test_chosen_probability_agrees_with_float64_softmax_on_model_logits():
    model = tiny_vlm()
    ids, P = prompt_and_answer(model)
    with torch.no_grad():
        logits = model(ids, model.encode_images(torch.randn(2, 3, 48, 48)))
    for scale in (1.0, 300.0):  # sharp logits too: log-sum-exp never overflows
        scaled = logits * scale
        chosen = scaled.argmax(-1)
        reference = torch.softmax(scaled.double(), -1).gather(-1, chosen[..., None]).squeeze(-1)
        torch.testing.assert_close(rediff.chosen_probability(scaled, chosen), reference, rtol=1e-12, atol=0)


def test_chosen_probability_orders_float32_near_ties_like_the_reference():
    v = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    k = int(v.argsort()[25])                                               # not the argmax
    w = v.clone()
    w[k] = torch.nextafter(w[k], torch.tensor(torch.inf))                 # one float32 step: p(argmax) drops a hair
    logits = torch.stack([w, v])[None]                                    # (1, 2, 50): position 1 is more confident
    chosen = logits.argmax(-1)
    reference = torch.softmax(logits.double(), -1).gather(-1, chosen[..., None]).squeeze(-1)
    assert reference[0, 1] > reference[0, 0]
    ours = rediff.chosen_probability(logits, chosen)
    assert ours[0, 1] > ours[0, 0], "top-k must see the same order as LLaDA's float64 softmax"


# ---------------------------------------------------------------------------------------------------- threshold

def fixed_confidences(confidence: dict, tokens: dict, length: int):
    """A logits_fn whose answer position j predicts tokens[j] with probability confidence[j], whatever the input."""
    def logits_fn(ids):
        probs = torch.full((ids.shape[0], length, V), 1.0)
        probs[..., MASK] = 0.0                                               # the mask is never a prediction
        for j, c in confidence.items():
            probs[:, j] = (1 - c) / (V - 2)                                  # the rest spread over the other tokens
            probs[:, j, tokens[j]] = c
            probs[:, j, MASK] = 0.0
        return torch.cat([torch.zeros(ids.shape[0], ids.shape[1] - length, V), probs.log()], dim=1)
    return logits_fn


def test_threshold_commits_every_confident_position_and_at_least_one():
    prompt = torch.zeros(1, 2, dtype=torch.long)
    conf = {0: 0.9, 1: 0.3, 2: 0.6, 3: 0.2}
    tokens = {0: 3, 1: 4, 2: 5, 3: 6}
    out, trace = rediff.generate(fixed_confidences(conf, tokens, 4), prompt, 4, 4, mask_id=MASK, threshold=0.5,
                                 return_trace=True)
    committed = [t["new"][0].nonzero().flatten().tolist() for t in trace]
    assert committed == [[0, 2], [1], [3]], "both >= 0.5 at once, then the best one a step until no mask is left"
    assert out.tolist() == [[3, 4, 5, 6]]
    out, trace = rediff.generate(fixed_confidences(conf, tokens, 4), prompt, 4, 4, mask_id=MASK, threshold=0.0,
                                 refine=True, return_trace=True)
    assert len(trace) == 1 and out.tolist() == [[3, 4, 5, 6]], "threshold 0: the whole block in one step"
    _, trace = rediff.generate(fixed_confidences(conf, tokens, 4), prompt, 4, 2, block_length=2, mask_id=MASK,
                               threshold=0.95, return_trace=True)
    assert [t["new"][0].nonzero().flatten().tolist() for t in trace] == [[0], [1], [2], [3]], "block by block"


def test_threshold_rows_finish_independently_and_refine_keeps_going():
    prompt = torch.zeros(2, 2, dtype=torch.long)
    draft = torch.full((2, 4), MASK)
    draft[0, :3] = 7                                                        # row 0 has one mask left, row 1 four
    fn = fixed_confidences({0: 0.9, 1: 0.3, 2: 0.6, 3: 0.2}, {0: 3, 1: 4, 2: 5, 3: 6}, 4)
    out, trace = rediff.generate(fn, prompt, 4, 4, mask_id=MASK, threshold=0.5, draft=draft, refine=True,
                                 return_trace=True)
    assert [int(t["new"][0].sum()) for t in trace] == [1, 0, 0], "a finished row commits nothing more"
    assert out.tolist() == [[3, 4, 5, 6]] * 2, "refining rewrites row 0's draft with the argmax"


def test_threshold_none_is_the_default_sampler():
    from tests.test_rediff import MockModel
    prompt = torch.randint(0, 8, (3, 5), generator=torch.Generator().manual_seed(1))
    for refine in (False, True):
        a = rediff.generate(MockModel(seed=2), prompt, 16, 8, block_length=8, mask_id=MASK, refine=refine)
        b = rediff.generate(MockModel(seed=2), prompt, 16, 8, block_length=8, mask_id=MASK, refine=refine,
                            threshold=None, on_block=lambda start: None)
        assert torch.equal(a, b)


def test_right_aligned_logits_must_cover_the_block():
    prompt = torch.zeros(1, 3, dtype=torch.long)
    too_short = lambda ids: torch.zeros(ids.shape[0], 2, V)  # noqa: E731
    with pytest.raises(ValueError, match="last 2 positions"):
        rediff.generate(too_short, prompt, 4, 4, mask_id=MASK)


# ---------------------------------------------------------------------------------------------- tools/bench.py

def test_bench_quick_prints_the_table(capsys):
    from tools import bench
    rows = bench.main(["--quick", "--batch-sizes", "1", "--tokens-per-step", "1", "4", "--gen-length", "8",
                       "--train-batch", "2", "--train-steps", "1"])
    out = capsys.readouterr().out
    assert "| section | model | batch |" in out and "plain loop" in out and "prefix cache" in out
    assert "threshold 0.9" in out and "training step" in out and "matmul ceiling" in out
    assert all(r["ids_equal"] for r in rows if "ids_equal" in r), "the plain loop and the sampler agree at T = 0"
    assert "- sampler >= 1.5x the plain loop" in out


def test_prefix_dlm_flag_sets_the_prefix_length_and_old_configs_load_without_it():
    from dataclasses import asdict

    from data.pipeline import prompt_ids
    from data.tokenizer import WordTokenizer
    tok = WordTokenizer.for_shapes_world()
    cfg = bench_tiny_config(prefix_dlm=True)
    model = shapes_train.build_model(cfg, tok)
    assert model.cfg.prefix_dlm_len == len(prompt_ids(tok, model.n_image_tokens)) == model.n_image_tokens + 4
    saved = asdict(model.cfg)
    assert VLMConfig.from_dict(saved).prefix_dlm_len == model.cfg.prefix_dlm_len
    saved.pop("prefix_dlm_len")                                         # a checkpoint from before the option
    assert VLMConfig.from_dict(saved).prefix_dlm_len == 0
    assert shapes_train.build_model(bench_tiny_config(), tok).cfg.prefix_dlm_len == 0


def bench_tiny_config(**changes):
    from tools.bench import tiny_train_config
    return tiny_train_config(**changes)
