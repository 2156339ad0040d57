"""tools/bench.py: how fast are the sampler and the training step, and are the performance targets
met? Everything is measured in one process and compared with something measured in the same run:
the sampler with a plain LLaDA-style loop on the same model, the prefix cache and the confidence
threshold with the ordinary sampler, the training step with this machine's matrix-multiply rate.
It ends with one verdict line per target (met / not met, with the figure).

The model is a randomly initialised VLM of the --tiny shape (speed needs no training); --ckpt
benches a trained tiny checkpoint on shapes-world scenes instead, which also scores the captions,
and with a Prefix-DLM base (train_stage1.py --prefix-dlm) checks the fast sampler's headline
against the plain loop's on held-out scenes. Timings on a shared machine move; the ratios are what
to read, and each compared pair is timed in alternation (best of --repeats).

    python tools/bench.py              # the speed table and the verdicts (about a minute, 2 cores)
    python tools/bench.py --ckpt runs/base-prefix-dlm.safetensors --time-recipe   # every verdict
    python tools/bench.py --quick      # a smoke run of every row, in seconds
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)

import rediff  # noqa: E402
from cli import UsageError, check_writable, option, parse_config, run_main  # noqa: E402
from data.pipeline import prompt_ids  # noqa: E402
from sample import ModelLogits, banned_ids, caption_images, decode_answer, steps_for  # noqa: E402

# The performance targets the verdicts read (tools/bench.py's last lines; docs/speed.md)
RECIPE_SECONDS = 300        # 1: train_stage1.py --tiny (base and Stage I) on an idle 2-core machine
MATMUL_SHARE = 0.60         # 2: the training step's FLOP/s against the matmul rate of this run
SAMPLER_SPEEDUP = 5.0       # 3: the fast sampler against the plain loop, 256 image tokens ...
HEADLINE_POINTS = 1.0       # ... losing at most this much headline on the trained Prefix-DLM base
BENCH_SECONDS = 90          # 4: "about a minute"
Z95 = 1.96                  # a two-sided 95 % normal interval


@dataclass
class BenchConfig:
    batch_sizes: list = option([1, 8, 32], "captions decoded together in the sampler rows",
                               nargs="+", type=int, at_least=1)
    tokens_per_step: list = option([1, 2, 4, 8], "tokens committed per step in the sampler rows "
                                   "(the largest is the sampler target's)", nargs="+", type=int,
                                   at_least=1)
    gen_length: int = option(48, "answer length in tokens (the --tiny training answer length)",
                             at_least=1)
    repeats: int = option(2, "runs of each measurement, taking turns with what it is compared "
                          "to; the best counts", at_least=1)
    cache_batch: int = option(4, "batch size of the prefix-cache, threshold and sampler-target "
                              "rows", at_least=1)
    long_image_size: int = option(256, "image side of the long-prefix model: (side / 16)^2 image "
                                  "tokens (256 -> 256)", at_least=16)
    threshold: list = option([0.9, 0.7], "confidence thresholds P of the threshold rows (the "
                             "first is the sampler target's)", nargs="+", type=float,
                             more_than=0, at_most=1)
    train_steps: int = option(5, "timed training steps of the --tiny preset (after one warm-up "
                              "step)", at_least=1)
    train_batch: int = option(32, "training batch size (the --tiny preset's)", at_least=1)
    matmul_size: int = option(2048, "side of the square matmul that measures the machine's "
                              "ceiling", at_least=1)
    dtype: str = option("auto", "dtype of the training step and the matmul rate; auto: bfloat16 "
                        "where the CPU has bf16 instructions (AVX512-BF16, AMX), else float32",
                        choices=["auto", "float32", "bfloat16"])
    ckpt: str = option("", "bench this tiny checkpoint on shapes-world test scenes (scored) "
                       "instead of random weights; a Prefix-DLM base also gets the headline check")
    headline_scenes: int = option(4000, "held-out scenes of the headline check (--ckpt): "
                                  "enough to resolve one headline point", at_least=2)
    time_recipe: bool = option(False, "also time python train_stage1.py --tiny (several minutes) "
                               "in a subprocess writing to a temporary folder")
    threads: int = option(0, "torch threads (0: PyTorch's default)", at_least=0)
    seed: int = option(0, "seed of the random weights and images", at_least=0)
    json: str = option("", "also write every row as JSON to this file")


PRESETS = {"quick": {"help": "a smoke run in seconds: tiny sizes, one repeat (the numbers mean "
                             "little)",
                     "values": dict(batch_sizes=[1, 2], tokens_per_step=[1, 8], gen_length=16,
                                    repeats=1, cache_batch=2, long_image_size=64, threshold=[0.9],
                                    train_steps=1, train_batch=4, matmul_size=256,
                                    headline_scenes=8)}}


# -------------------------------------------------------------------------------------------------
# The plain loop the sampler is compared with, and the threshold rule of the sampler target


@torch.no_grad()
def plain_loop(model, tokenizer, images, gen_length: int, steps: int, refine: bool = False):
    """LLaDA's reference loop (the reverse process of Section 3.1; refine: Section 3.4) written the
    plain way: every step runs the vision tower again, computes the logits of every position, and
    takes each confidence from a float64 softmax over the whole vocabulary. Same model, schedule
    and banned ids as caption_images, so at temperature 0 it must give the same ids.
    Returns (ids (B, G), passes)."""
    B = images.shape[0]
    prompt = torch.tensor(prompt_ids(tokenizer, model.n_image_tokens)).expand(B, -1)   # (B, P)
    P = prompt.shape[1]
    x = torch.cat([prompt, torch.full((B, gen_length), tokenizer.mask_id)], dim=1)      # (B, L)
    never = banned_ids(tokenizer) + [tokenizer.mask_id]
    counts = rediff.transfer_schedule(torch.full((B,), gen_length), steps)              # (B, S)
    for i in range(steps):
        logits = model(x, model.encode_images(images))                                  # (B, L, V)
        logits[:, :, never] = -torch.inf
        x0 = logits.argmax(dim=-1)                                                      # (B, L)
        probs = torch.softmax(logits.double(), dim=-1)                          # (B, L, V) float64
        masked = x == tokenizer.mask_id                                                 # (B, L)
        confidence = torch.where(masked, probs.gather(-1, x0[..., None]).squeeze(-1), -torch.inf)
        commit = torch.zeros_like(masked)
        for row in range(B):
            commit[row, confidence[row].topk(int(counts[row, i])).indices] = True
        if refine:  # the prompt is never masked, so ~masked & answer = the visible answer tokens
            x[:, P:] = torch.where(masked[:, P:], x[:, P:], x0[:, P:])
        x = torch.where(commit, x0, x)
    answer = x[:, P:]
    after_stop = (answer == tokenizer.eos_id).long().cumsum(dim=1) > 0
    return torch.where(after_stop, torch.full_like(answer, tokenizer.eos_id), answer), steps


@torch.no_grad()
def floored_threshold(model, tokenizer, images, gen_length: int, tokens_per_step: int,
                      threshold: float, prefix_cache: bool = False, refine: bool = False,
                      row_steps: list | None = None):
    """Threshold decoding at `tokens_per_step` tokens per step, the sampler target's rule: each step
    commits the step's tokens_per_step most confident masked positions, as the fixed schedule does
    (LLaDA's low-confidence remasking, Section 3.1), plus every other masked position whose
    confidence is at least `threshold` (Fast-dLLM's confidence-aware parallel decoding), so a
    caption never takes more steps than the schedule. One block, end-of-text stop, as
    caption_images. rediff.generate's threshold= commits at least one token a step, not
    tokens_per_step, so the floor is applied here: the step's best tokens_per_step get confidence
    1 before denoise_steps compares with the threshold. Returns (ids (B, G), forward passes: the
    batch's, which its slowest row sets); row_steps, a list, receives the steps each row needed
    (B,)."""
    device = next(model.parameters()).device
    image_embeds = model.encode_images(images.to(device))                          # (B, N, D)
    prompt = torch.tensor(prompt_ids(tokenizer, model.n_image_tokens), device=device)
    prompt = prompt.expand(images.shape[0], -1)                                     # (B, P)
    P, mask_id = prompt.shape[1], tokenizer.mask_id
    logits_fn = ModelLogits(model, image_embeds, P, prefix_cache)
    x = torch.full((prompt.shape[0], P + gen_length), mask_id, device=device)       # (B, L)
    x[:, :P] = prompt
    stops = rediff.EndOfText(tokenizer.eos_id, x, P, mask_id)
    predict = rediff.step_predictor(logits_fn, P, mask_id, banned_ids(tokenizer))
    steps = torch.zeros(x.shape[0], dtype=torch.long, device=device)                # (B,)

    def with_floor(x, start: int, end: int):
        x0, confidence = predict(x, start, end)                                    # (B, Lb) each
        masked = x[:, start:end] == mask_id                                        # (B, Lb)
        steps.add_(masked.any(dim=1))
        ranked = torch.where(masked, confidence, -torch.inf)                       # (B, Lb)
        best = ranked.topk(min(tokens_per_step, ranked.shape[1]), dim=1).indices   # (B, k)
        floor = torch.zeros_like(masked).scatter(1, best, True) & masked           # (B, Lb)
        return x0, torch.where(floor, torch.ones_like(confidence), confidence)

    for _ in rediff.denoise_steps(with_floor, x, P, 1, steps_for(gen_length, tokens_per_step),
                                  mask_id, refine, threshold, stops, logits_fn.begin_block):
        pass
    if row_steps is not None:
        row_steps.append(steps)
    return stops.answer(x), logits_fn.forward_passes


# -------------------------------------------------------------------------------------------------
# Timing helpers


def race(runs: dict, repeats: int) -> dict:
    """Time each zero-argument function `repeats` times, taking turns (a busy machine then slows all
    of them alike). Returns {name: (best seconds, its last result)}."""
    best, result = {}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            result[name] = fn()
            best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    return {name: (best[name], result[name]) for name in runs}


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (the flags avx512_bf16 or amx_bf16 of
    /proc/cpuinfo; False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def matmul_rate(n: int, dtype=torch.float32, repeats: int = 3) -> float:
    """This machine's matrix-multiply rate in FLOP/s: the best of a few (n x n) @ (n x n)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    seconds = race({"mm": lambda: a @ b}, repeats)["mm"][0]
    return 2 * n ** 3 / seconds


def agreement(a, b) -> float:
    return (a == b).float().mean().item()


# -------------------------------------------------------------------------------------------------
# Models and inputs


def tiny_train_config(**changes):
    from train_stage1 import PRESETS as TRAIN_PRESETS, TrainConfig
    return dataclasses.replace(TrainConfig(**TRAIN_PRESETS["tiny"]["values"]), **changes)


def build(tokenizer, image_size: int, seed: int, prefix_dlm: bool = False):
    """A randomly initialised VLM of the --tiny shape; image_size / 16 patches a side (48 px: 9
    image tokens); prefix_dlm: with the Prefix-DLM mask (train_stage1.py --prefix-dlm), under which
    the prefix cache is exact."""
    from train_stage1 import build_model
    torch.manual_seed(seed)
    return build_model(tiny_train_config(image_size=image_size, prefix_dlm=prefix_dlm),
                       tokenizer).eval()


def inputs(model, batch: int, seed: int, world=None):
    """(images (B, 3, S, S), scenes or None): shapes-world test scenes with a checkpoint, random
    pixels without."""
    from data import shapes
    from data.pipeline import image_to_tensor
    vision = model.cfg.vision
    if world is None:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(batch, 3, vision.image_size, vision.image_size, generator=g) * 2 - 1, None
    samples = [shapes.sample("test", seed * 10_000 + i, world) for i in range(batch)]
    return (image_to_tensor([s["image"] for s in samples], vision.mean, vision.std),
            [s["scene"] for s in samples])


def headline(tokenizer, ids, scenes) -> str:
    if scenes is None:
        return ""
    from data.score import score_captions
    texts = [decode_answer(tokenizer, row) for row in ids]
    return f"{score_captions(texts, scenes)['headline']:.1f}"


# -------------------------------------------------------------------------------------------------
# The sections


def bench_sampler(model, tokenizer, cfg: BenchConfig, world) -> list[dict]:
    """Frozen and refining sampler (Sections 3.1 and 3.4) at every batch size and tokens per step,
    and the plain loop (frozen) beside it."""
    rows = []
    G = cfg.gen_length
    for B in cfg.batch_sizes:
        images, scenes = inputs(model, B, cfg.seed, world)
        caption_images(model, tokenizer, images[:1], G, G)  # warm-up
        runs = {}
        for n in cfg.tokens_per_step:
            for refine in (False, True):
                runs[("sampler", n, refine)] = (
                    lambda n=n, r=refine: caption_images(model, tokenizer, images, G, n, r))
            runs[("plain", n, False)] = (
                lambda n=n: plain_loop(model, tokenizer, images, G, steps_for(G, n)))
        timed = race(runs, cfg.repeats)
        one = min(cfg.tokens_per_step)
        for n in cfg.tokens_per_step:
            for kind, refine in (("sampler", False), ("sampler", True), ("plain", False)):
                seconds, (ids, passes) = timed[(kind, n, refine)]
                row = {"section": "sampler" if kind == "sampler" else "plain loop",
                       "model": "tiny", "batch": B, "tokens_per_step": n,
                       "sampler": "refining" if refine else "frozen", "passes": passes,
                       "seconds": seconds, "score": headline(tokenizer, ids, scenes)}
                notes = [] if n == one else [
                    f"wall {seconds / timed[(kind, one, refine)][0]:.3f} of {one} tok/step"]
                if kind == "sampler" and refine:
                    frozen_s, (_, frozen_passes) = timed[("sampler", n, False)]
                    row["refine_overhead"] = (seconds / passes) / (frozen_s / frozen_passes) - 1
                    notes.append(f"{100 * row['refine_overhead']:+.1f}% per step vs frozen")
                if kind == "plain":
                    ours_s, (ours_ids, _) = timed[("sampler", n, False)]
                    row["speedup_of_sampler"] = seconds / ours_s
                    row["ids_equal"] = bool(torch.equal(ids, ours_ids))
                    notes.append(f"sampler {row['speedup_of_sampler']:.2f}x faster")
                row["ratio"] = "; ".join(notes)
                row["ids"] = ("equal" if row["ids_equal"] else "DIFFER") if kind == "plain" else ""
                rows.append(row)
    return rows


def bench_fast_dllm(tokenizer, cfg: BenchConfig, trained=None, world=None) -> list[dict]:
    """Prefix cache against the ordinary sampler, on the tiny shapes (9 image tokens) and the
    long-prefix shape (random weights; bidirectional, and with the Prefix-DLM mask), frozen and
    refining; then the confidence threshold on the tiny shapes (the plain loop on the long shape:
    bench_sampler_target)."""
    rows = []
    G, B = cfg.gen_length, cfg.cache_batch
    one = min(cfg.tokens_per_step)
    configs = [("tiny", trained or build(tokenizer, 48, cfg.seed), world),
               ("long", build(tokenizer, cfg.long_image_size, cfg.seed), None),
               ("long prefix-dlm",
                build(tokenizer, cfg.long_image_size, cfg.seed, prefix_dlm=True), None)]
    for name, model, scenes_world in configs:
        images, scenes = inputs(model, B, cfg.seed, scenes_world)
        label = f"{name} ({model.n_image_tokens} img)"
        caption_images(model, tokenizer, images[:1], G, G, prefix_cache=True)  # warm-up
        for refine in (False, True):
            runs = {"off": lambda r=refine: caption_images(model, tokenizer, images, G, one, r)}
            runs["cache"] = lambda r=refine: caption_images(model, tokenizer, images, G, one, r,
                                                            prefix_cache=True)
            timed = race(runs, cfg.repeats)
            base_s, (base_ids, base_passes) = timed["off"]
            sampler = "refining" if refine else "frozen"
            rows.append({"section": "no cache", "model": label, "batch": B,
                         "tokens_per_step": one, "sampler": sampler, "passes": base_passes,
                         "seconds": base_s, "score": headline(tokenizer, base_ids, scenes),
                         "ratio": "", "ids": ""})
            seconds, (ids, passes) = timed["cache"]
            rows.append({"section": "prefix cache", "model": label, "batch": B,
                         "tokens_per_step": one, "sampler": sampler, "passes": passes,
                         "seconds": seconds, "score": headline(tokenizer, ids, scenes),
                         "cache_speedup": base_s / seconds,
                         "identical_tokens": agreement(ids, base_ids),
                         "ratio": f"{base_s / seconds:.2f}x the speed of no cache",
                         "ids": f"{100 * agreement(ids, base_ids):.1f}% identical"})
    model, scenes_world = configs[0][1], configs[0][2]
    images, scenes = inputs(model, B, cfg.seed, scenes_world)
    for refine in (False, True):
        runs = {n: (lambda n=n, r=refine: caption_images(model, tokenizer, images, G, n, r))
                for n in sorted({one, max(cfg.tokens_per_step)})}
        for p in cfg.threshold:
            runs[f"threshold {p}"] = (lambda r=refine, p=p: caption_images(
                model, tokenizer, images, G, one, r, threshold=p))
        timed = race(runs, cfg.repeats)
        base_s, (base_ids, _) = timed[one]
        for key, (seconds, (ids, passes)) in timed.items():
            if key == one:
                continue
            threshold = isinstance(key, str)
            rows.append({"section": key if threshold else "fixed schedule",
                         "model": configs[0][0] + f" ({model.n_image_tokens} img)", "batch": B,
                         "tokens_per_step": "-" if threshold else key,
                         "sampler": "refining" if refine else "frozen", "passes": passes,
                         "seconds": seconds, "score": headline(tokenizer, ids, scenes),
                         "ratio": f"{base_s / seconds:.2f}x the speed of {one} tok/step",
                         "ids": f"{100 * agreement(ids, base_ids):.1f}% same as {one} tok/step"})
    return rows


def target_samplers(model, tokenizer, images, G: int, n: int, p: float, row_steps=None) -> dict:
    """The sampler target's ingredients, frozen, at n tokens per step: the plain loop, our sampler
    (caption_images), + the prefix cache (exact under the Prefix-DLM mask), + the floored threshold
    P, and all combined (its steps per row into row_steps). {label: zero-argument function ->
    (ids (B, G), passes)}."""
    return {"plain loop": lambda: plain_loop(model, tokenizer, images, G, steps_for(G, n)),
            "+ our sampler": lambda: caption_images(model, tokenizer, images, G, n, False),
            "+ exact prefix cache": lambda: caption_images(model, tokenizer, images, G, n, False,
                                                           prefix_cache=True),
            f"+ threshold {p}": lambda: floored_threshold(model, tokenizer, images, G, n, p),
            "all combined": lambda: floored_threshold(model, tokenizer, images, G, n, p,
                                                      prefix_cache=True, row_steps=row_steps)}


def bench_sampler_target(tokenizer, cfg: BenchConfig) -> list[dict]:
    """Target 3's speed: each ingredient on the long-prefix Prefix-DLM shape (random weights, batch
    --cache-batch) at the largest --tokens-per-step, against the plain loop. Random weights are
    never confident, so the threshold adds no commits here (the headline check counts them on a
    trained model)."""
    G, B, n, p = cfg.gen_length, cfg.cache_batch, max(cfg.tokens_per_step), cfg.threshold[0]
    model = build(tokenizer, cfg.long_image_size, cfg.seed, prefix_dlm=True)
    images, _ = inputs(model, B, cfg.seed)
    caption_images(model, tokenizer, images[:1], G, G, False, prefix_cache=True)  # warm-up
    timed = race(target_samplers(model, tokenizer, images, G, n, p), cfg.repeats)
    plain_s, (plain_ids, _) = timed["plain loop"]
    ours_s = timed["+ our sampler"][0]
    rows = []
    for label, (seconds, (ids, passes)) in timed.items():
        over = "" if label in ("plain loop", "+ our sampler") else \
            f" ({ours_s / seconds:.2f}x our sampler)"
        rows.append({"section": f"target: {label}", "model": f"long prefix-dlm "
                     f"({model.n_image_tokens} img)", "batch": B, "tokens_per_step": n,
                     "sampler": "frozen", "passes": passes, "seconds": seconds, "score": "",
                     "speedup_vs_plain": plain_s / seconds,
                     "ratio": f"{plain_s / seconds:.2f}x the plain loop{over}",
                     "ids": f"{100 * agreement(ids, plain_ids):.1f}% same as the plain loop"})
        rows[-1].update(exact="threshold" not in label and label != "all combined",
                        ids_equal=bool(torch.equal(ids, plain_ids)))
        if label == "+ our sampler":  # also read by the sampler-vs-plain-loop check
            rows[-1]["speedup_of_sampler"] = plain_s / seconds
    return rows


def headline_check(model, tokenizer, world, cfg: BenchConfig) -> list[dict]:
    """Target 3's quality: the plain loop and all ingredients combined on --headline-scenes held-out
    scenes (tools/eval.py's), scored per caption; the paired difference's mean and 95 % interval
    (the same scenes, so most captions cancel), and the combined sampler's forward passes."""
    from data import shapes
    from data.pipeline import held_out_indices, image_to_tensor
    from data.score import score_caption
    G, n, p = cfg.gen_length, max(cfg.tokens_per_step), cfg.threshold[0]
    indices = held_out_indices(cfg.headline_scenes, cfg.seed)
    scores = {"plain loop": [], "all combined": []}
    seconds, passes, same, row_steps = dict.fromkeys(scores, 0.0), 0, 0, []
    vision = model.cfg.vision
    for lo in range(0, len(indices), 100):
        samples = [shapes.sample("test", i, world) for i in indices[lo:lo + 100]]
        images = image_to_tensor([s["image"] for s in samples], vision.mean, vision.std)
        runs = target_samplers(model, tokenizer, images, G, n, p, row_steps)
        ids = {}
        for label in scores:
            start = time.perf_counter()
            ids[label], calls = runs[label]()
            seconds[label] += time.perf_counter() - start
            scores[label] += [score_caption(decode_answer(tokenizer, row), s["scene"])["headline"]
                              for row, s in zip(ids[label], samples)]
        passes += calls * len(samples)
        same += int((ids["plain loop"] == ids["all combined"]).all(dim=1).sum())
    N = len(indices)
    diffs = [b - a for a, b in zip(scores["plain loop"], scores["all combined"])]
    mean = sum(diffs) / N
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (N - 1) / N)
    label = f"{os.path.basename(cfg.ckpt)} ({model.n_image_tokens} img)"
    rows = []
    for sampler, values in scores.items():
        row = {"section": f"headline check: {sampler}", "model": label, "batch": N,
               "tokens_per_step": n, "sampler": "frozen",
               "passes": f"{passes / N:.2f}" if sampler == "all combined" else f"{steps_for(G, n)}",
               "seconds": seconds[sampler], "score": f"{sum(values) / N:.1f}", "ratio": "",
               "ids": ""}
        if sampler == "all combined":
            caption_steps = torch.cat(row_steps).float().mean().item()
            row.update(headline_diff=mean, headline_se=se, scenes=N, mean_passes=passes / N,
                       caption_steps=caption_steps,
                       ratio=f"{mean:+.2f} +- {Z95 * se:.2f} headline (95 %) vs the plain loop; "
                             f"{caption_steps:.2f} steps a caption; "
                             f"{seconds['plain loop'] / seconds[sampler]:.2f}x its speed",
                       ids=f"{100 * same / N:.1f}% of captions same as the plain loop")
        rows.append(row)
    return rows


def training_flops(model, seq_len: int) -> float:
    """FLOPs of one training sample, counted as nanoGPT does: a weight used by one token costs 2
    FLOPs forward and 4 backward; attention costs 4 L^2 D per layer forward (QK^T and AV), x3 with
    the backward. The vision tower is frozen (forward only, N patches + the class token); the
    projector and the language model train."""
    lm = model.lm
    lm_weights = (sum(p.numel() for p in lm.layers.parameters() if p.dim() == 2)
                  + lm.lm_head.weight.numel())
    flops = 6 * lm_weights * seq_len + 3 * 4 * lm.cfg.n_layers * seq_len ** 2 * lm.cfg.d_model
    n = model.n_image_tokens
    flops += 6 * sum(p.numel() for p in model.mm_projector.parameters() if p.dim() == 2) * n
    visual, vision = model.vision_tower.visual, model.cfg.vision
    flops += 2 * visual.conv1.weight.numel() * n                                # patch embedding
    tower = sum(p.numel() for p in visual.transformer.parameters() if p.dim() == 2)
    flops += 2 * tower * (n + 1) + 4 * vision.layers * (n + 1) ** 2 * vision.width
    return flops


def bench_training(tokenizer, cfg: BenchConfig, dtype: torch.dtype, ceiling: float) -> list[dict]:
    """The --tiny training step (Stage I's typed losses, Eq. 2-3: corruption, forward, backward,
    clip, AdamW), data included; in bfloat16 autocast when dtype is bfloat16."""
    from data import shapes
    from data.pipeline import ShapesData
    from train_stage1 import build_model, freeze_vision, training_loss
    tcfg = tiny_train_config(batch_size=cfg.train_batch)
    torch.manual_seed(cfg.seed)
    model = build_model(tcfg, tokenizer)
    world = shapes.WorldConfig(image_size=tcfg.image_size, max_words=tcfg.answer_len - 1)
    data = ShapesData(tokenizer, world, "train", max(64, cfg.train_batch), model.n_image_tokens,
                      tcfg.answer_len, cfg.seed, model.cfg.vision.mean, model.cfg.vision.std)
    freeze_vision(model)
    model.train()
    model.vision_tower.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, betas=(0.9, 0.95),
                                  weight_decay=tcfg.weight_decay)

    def step(k):
        batch = data.batch(k, tcfg.batch_size, tcfg.hallucination_frac)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, _ = training_loss(model, batch, tcfg, tokenizer, torch.Generator().manual_seed(k))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        optimizer.step()

    step(0)  # warm-up
    start = time.perf_counter()
    for k in range(1, cfg.train_steps + 1):
        step(k)
    seconds = (time.perf_counter() - start) / cfg.train_steps
    seq_len = len(data.prompt) + tcfg.answer_len
    flops = training_flops(model, seq_len) * tcfg.batch_size
    name = str(dtype).removeprefix("torch.")
    return [{"section": "training step", "model": f"tiny, {name}", "batch": tcfg.batch_size,
             "tokens_per_step": "-", "sampler": "-", "passes": "-", "seconds": seconds,
             "score": "", "tokens_per_s": tcfg.batch_size * seq_len / seconds,
             "flops_per_s": flops / seconds,
             "ratio": f"{tcfg.batch_size * seq_len / seconds:,.0f} tok/s; "
                      f"{flops / seconds / 1e9:.1f} GFLOP/s = "
                      f"{100 * flops / seconds / ceiling:.1f}% of the matmul rate", "ids": ""},
            {"section": "matmul ceiling", "model": f"{name} {cfg.matmul_size}^3", "batch": "-",
             "tokens_per_step": "-", "sampler": "-", "passes": "-",
             "seconds": 2 * cfg.matmul_size ** 3 / ceiling, "score": "", "flops_per_s": ceiling,
             "dtype": name, "native_bf16": native_bf16(),
             "ratio": f"{ceiling / 1e9:.1f} GFLOP/s", "ids": ""}]


def recipe_command(folder: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train_stage1.py"), "--tiny", "--out",
            os.path.join(folder, "stage1.safetensors")]


def time_recipe(load_before: float, command=recipe_command) -> dict:
    """Target 1, measured: `command(folder)` (python train_stage1.py --tiny: the base model, Eq. 1,
    then Stage I, Eq. 2-3) in a subprocess writing to a temporary folder, before the bench's own
    work; load_before, the load average when the run started, says whether the machine was idle."""
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as folder:
        log_path = os.path.join(folder, "log.txt")
        start = time.perf_counter()
        with open(log_path, "w") as log:
            done = subprocess.run(command(folder), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
        seconds = time.perf_counter() - start
        if done.returncode:
            with open(log_path) as log:
                tail = log.read()[-2000:]
            raise SystemExit(f"--time-recipe: {' '.join(command(folder))} failed with exit "
                             f"status {done.returncode}; its output ended:\n{tail}")
    return {"section": "recipe", "model": "train_stage1.py --tiny", "batch": "-",
            "tokens_per_step": "-", "sampler": "-", "passes": "-", "seconds": seconds,
            "score": "", "measured": True, "load_before": load_before,
            "ratio": f"{seconds / 60:.1f} min, load average {load_before:.2f} before",
            "ids": ""}


def project_recipe(rows: list[dict]) -> dict:
    """Target 1, projected (not measured): the --tiny recipe's language-model steps (base and
    Stage I) times this run's training step; vision pretraining, rendering and validation are left
    out."""
    from train_stage1 import PRESETS as TRAIN_PRESETS
    steps = TRAIN_PRESETS["tiny"]["values"]["steps"] + TRAIN_PRESETS["tiny"]["stage1"]["steps"]
    step_s = next(r["seconds"] for r in rows if r["section"] == "training step")
    return {"section": "recipe (projected)", "model": "train_stage1.py --tiny", "batch": "-",
            "tokens_per_step": "-", "sampler": "-", "passes": "-", "seconds": steps * step_s,
            "score": "", "measured": False, "steps": steps, "step_seconds": step_s,
            "ratio": f"projected: {steps:,} steps x {step_s:.3f} s", "ids": ""}


# -------------------------------------------------------------------------------------------------
# The table, the checks of the earlier speed work and the targets' verdicts


def markdown(rows: list[dict]) -> str:
    lines = ["| section | model | batch | tok/step | sampler | passes | ms/step | captions/s "
             "| score | ratio | ids |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        timed = isinstance(r["passes"], int)
        per_step = f"{1000 * r['seconds'] / r['passes']:.2f}" if timed else "-"
        per_s = f"{r['batch'] / r['seconds']:.2f}" if timed else "-"
        lines.append(f"| {r['section']} | {r['model']} | {r['batch']} | {r['tokens_per_step']} "
                     f"| {r['sampler']} | {r['passes']} | {per_step} | {per_s} "
                     f"| {r['score'] or '-'} | {r['ratio'] or '-'} | {r['ids'] or '-'} |")
    return "\n".join(lines)


def checks(rows: list[dict], one: int, eight: int) -> list[str]:
    """The earlier speed checks (refinement's cost, the 8-token wall, the plain loop, the cache),
    each read off the rows above."""
    out = []
    overheads = [r["refine_overhead"] for r in rows if "refine_overhead" in r]
    if overheads:  # pooled: the same forward passes, so total refining time over total frozen time
        refining = sum(r["seconds"] for r in rows if "refine_overhead" in r)
        frozen = sum(r["seconds"] for r in rows
                     if r["section"] == "sampler" and r["sampler"] == "frozen")
        pooled = refining / frozen - 1
        out.append(f"- refining costs <= 5% per step over frozen: {100 * pooled:+.1f}% pooled over "
                   f"the sampler rows (single rows {100 * min(overheads):+.1f}% to "
                   f"{100 * max(overheads):+.1f}%: timing noise) -> "
                   f"{'met' if pooled <= 0.05 else 'NOT met'}")
    walls = {(r["batch"], r["sampler"], r["tokens_per_step"]): r["seconds"]
             for r in rows if r["section"] == "sampler"}
    fractions = [walls[(b, s, eight)] / walls[(b, s, n)]
                 for (b, s, n) in walls if n == one and (b, s, eight) in walls]
    if fractions and one != eight:
        worst = max(fractions)
        out.append(f"- {eight} tok/step wall <= 1/6 of {one} tok/step: worst 1/{1 / worst:.1f} -> "
                   f"{'met' if worst <= 1 / 6 else 'NOT met'}")
    plain = [r for r in rows if "speedup_of_sampler" in r]
    if plain:
        parts = []
        for model in dict.fromkeys(r["model"] for r in plain):
            s = [r["speedup_of_sampler"] for r in plain if r["model"] == model]
            parts.append(f"{model} {min(s):.2f}x to {max(s):.2f}x" if len(s) > 1
                         else f"{model} {s[0]:.2f}x")
        worst = min(r["speedup_of_sampler"] for r in plain)
        same = all(r["ids_equal"] for r in plain)
        out.append(f"- sampler >= 1.5x the plain loop: {'; '.join(parts)}; ids "
                   f"{'all equal' if same else 'DIFFER'} -> "
                   f"{'met' if worst >= 1.5 else 'met only where >= 1.5x'}")
    long = [r for r in rows if "cache_speedup" in r and r["model"].startswith("long")
            and r["section"] == "prefix cache"]
    if long:
        out.append("- prefix cache >= 2x on the long prefix: " + ", ".join(
            f"{r['model'].split(' (')[0]} {r['sampler']} {r['cache_speedup']:.2f}x "
            f"({100 * r['identical_tokens']:.1f}% identical tokens)"
            for r in long) + f" -> {verdict(min(r['cache_speedup'] for r in long) >= 2)}")
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def sampler_target_verdict(rows: list[dict]) -> str:
    """Target 3 from the "target: ..." rows and the headline check: the fastest combination whose
    headline is within HEADLINE_POINTS of the plain loop's must be >= SAMPLER_SPEEDUP x the plain
    loop. An exact combination (no threshold) qualifies when its ids equal the plain loop's (then
    the headline is the same); one with the threshold only when the headline check's 95 % interval
    lies above -HEADLINE_POINTS (its ids do match on random weights: no token is confident)."""
    fast = [r for r in rows if r["section"].startswith("target: + ")
            or r["section"] == "target: all combined"]
    line = f"target 3, sampler >= {SAMPLER_SPEEDUP:g}x the plain loop, headline within " \
           f"{HEADLINE_POINTS:g} point: "
    if not fast:
        return line + "not measured in this run"
    exact = [r for r in fast if r["exact"] and r["ids_equal"]]
    line += f"on {fast[0]['model']} at {fast[0]['tokens_per_step']} tok/step"
    if exact:
        best = max(exact, key=lambda r: r["speedup_vs_plain"])
        line += (f", fastest exact {best['section'].removeprefix('target: ')} "
                 f"{best['speedup_vs_plain']:.2f}x (the plain loop's ids)")
    combined = next((r for r in fast if r["section"] == "target: all combined"), None)
    check = next((r for r in rows if r["section"] == "headline check: all combined"), None)
    qualifying = list(exact)
    if combined is not None:
        line += f", all combined {combined['speedup_vs_plain']:.2f}x"
        if check is None:
            line += " with its headline unchecked (--ckpt a Prefix-DLM base)"
        else:
            low = check["headline_diff"] - Z95 * check["headline_se"]
            high = check["headline_diff"] + Z95 * check["headline_se"]
            line += (f" with headline {check['headline_diff']:+.2f} (95 % {low:+.2f} to "
                     f"{high:+.2f}) over {check['scenes']} scenes, {check['caption_steps']:.2f} "
                     f"steps a caption")
            if low >= -HEADLINE_POINTS:
                qualifying += [r for r in fast if not r["exact"]]
    best = max((r["speedup_vs_plain"] for r in qualifying), default=0.0)
    return line + f" -> {verdict(best >= SAMPLER_SPEEDUP)}"


def targets(rows: list[dict], bench_seconds: float) -> list[str]:
    """One verdict line per performance target, each computed from this run's rows: 1 the --tiny
    recipe's time (the "recipe" row; a "recipe (projected)" row is shown, never judged), 2 the
    training step against the matmul rate, 3 the sampler target (sampler_target_verdict), 4 the
    bench's own time (bench_seconds: the headline check and the recipe excluded)."""
    by = {r["section"]: r for r in rows}
    minutes = RECIPE_SECONDS // 60
    if "recipe" in by:
        r = by["recipe"]
        one = (f"{r['seconds'] / 60:.1f} min measured (load average {r['load_before']:.2f} "
               f"before) -> {verdict(r['seconds'] <= RECIPE_SECONDS)}")
    elif "recipe (projected)" in by:
        r = by["recipe (projected)"]
        one = (f"not timed in this run (--time-recipe); projected, not measured: "
               f"{r['steps']:,} steps x {r['step_seconds']:.3f} s = {r['seconds'] / 60:.1f} min "
               f"plus vision pretraining and rendering")
    else:
        one = "not timed in this run (--time-recipe)"
    lines = [f"target 1, train_stage1.py --tiny <= {minutes} min: {one}"]
    if "training step" in by and "matmul ceiling" in by:
        step, mm = by["training step"], by["matmul ceiling"]
        share = step["flops_per_s"] / mm["flops_per_s"]
        lines.append(f"target 2, training step >= {MATMUL_SHARE:.0%} of the matmul rate: "
                     f"{step['flops_per_s'] / 1e9:.1f} GFLOP/s = {share:.1%} of "
                     f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s ({mm['dtype']}; this CPU has "
                     f"{'' if mm['native_bf16'] else 'no '}native bf16) -> "
                     f"{verdict(share >= MATMUL_SHARE)}")
    else:
        lines.append("target 2, training step vs the matmul rate: not measured in this run")
    lines.append(sampler_target_verdict(rows))
    lines.append(f"target 4, bench in about a minute (<= {BENCH_SECONDS} s): {bench_seconds:.0f} s "
                 f"(the headline check and the recipe excluded) -> "
                 f"{verdict(bench_seconds <= BENCH_SECONDS)}")
    return lines


def main(argv=None):
    cfg = parse_config(BenchConfig, argv, description=__doc__, presets=PRESETS)
    patch = tiny_train_config().patch_size
    if cfg.long_image_size % patch:
        example = cfg.long_image_size // patch * patch or patch
        raise UsageError(f"--long-image-size {cfg.long_image_size}: must be a multiple of the "
                         f"patch size {patch}, e.g. {example}")
    check_writable(cfg.json, "--json")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from data.tokenizer import WordTokenizer, tokenizer_from_dict
    load_before = os.getloadavg()[0]  # before any work of this run: was the machine idle?
    trained, world = None, None
    if cfg.ckpt:
        from data import shapes
        from model import load_for
        trained, meta = load_for(cfg.ckpt, "--ckpt", needs=("tokenizer", "world", "answer_len"),
                                 fix="pass a checkpoint written by train_stage1.py or "
                                     "train_stage2.py")
        trained.eval()
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        world = shapes.WorldConfig(**meta["world"])
        cfg.gen_length = meta["answer_len"]
    else:
        tokenizer = WordTokenizer.for_shapes_world()
    recipe = time_recipe(load_before) if cfg.time_recipe else None  # first: nothing else runs
    start = time.perf_counter()
    model = trained or build(tokenizer, 48, cfg.seed)
    dtype = {"auto": torch.bfloat16 if native_bf16() else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    weights = f"checkpoint {cfg.ckpt}" if cfg.ckpt else "random --tiny weights"
    print(f"bench: {weights}, {model.num_params() / 1e6:.2f} M parameters, "
          f"{model.n_image_tokens} image tokens, answer {cfg.gen_length} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average "
          f"{load_before:.2f} before this run")
    ceiling = matmul_rate(cfg.matmul_size, dtype)
    rows = bench_sampler(model, tokenizer, cfg, world)
    rows += bench_fast_dllm(tokenizer, cfg, trained, world)
    rows += bench_sampler_target(tokenizer, cfg)
    rows += bench_training(tokenizer, cfg, dtype, ceiling)
    bench_seconds = time.perf_counter() - start  # target 4: the headline check and recipe excluded
    if trained is not None and trained.cfg.prefix_dlm_len:
        rows += headline_check(trained, tokenizer, world, cfg)
    elif trained is not None:
        print(f"{cfg.ckpt} has no Prefix-DLM mask: no headline check (its prefix cache is not "
              f"exact)")
    if recipe is not None:
        rows.append(recipe)
    elif cfg.train_batch == tiny_train_config().batch_size:
        rows.append(project_recipe(rows))
    print(markdown(rows))
    print("\n".join(checks(rows, min(cfg.tokens_per_step), max(cfg.tokens_per_step))))
    print("\n".join(targets(rows, bench_seconds)))
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "bench_seconds": bench_seconds,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    run_main(main)
