"""tools/bench.py: how fast are the sampler and the training step? Everything is measured in one
process and compared with something measured in the same run: the sampler with a plain LLaDA-style
loop on the same model, the prefix cache and the confidence threshold with the ordinary sampler,
the training step with this machine's matrix-multiply rate.

The model is a randomly initialised VLM of the --tiny shape (speed needs no training); --ckpt benches a trained tiny
checkpoint on shapes-world scenes instead, which also scores the captions. Timings on a shared machine move; the
ratios are what to read, and each compared pair is timed in alternation (best of --repeats).

    python tools/bench.py              # the speed table (about a minute on 2 CPU cores)
    python tools/bench.py --quick      # a smoke run of every row, in seconds
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)

import rediff  # noqa: E402
from cli import UsageError, check_writable, option, parse_config, run_main  # noqa: E402
from data.pipeline import prompt_ids  # noqa: E402
from sample import banned_ids, caption_images, decode_answer, steps_for  # noqa: E402


@dataclass
class BenchConfig:
    batch_sizes: list = option([1, 8, 32], "captions decoded together in the sampler rows", nargs="+", type=int,
                               at_least=1)
    tokens_per_step: list = option([1, 2, 4, 8], "tokens committed per step in the sampler rows", nargs="+", type=int,
                                   at_least=1)
    gen_length: int = option(48, "answer length in tokens (the --tiny training answer length)",
                             at_least=1)
    repeats: int = option(3, "runs of each measurement, taking turns with what it is compared to; the best counts",
                          at_least=1)
    cache_batch: int = option(4, "batch size of the prefix-cache and threshold rows", at_least=1)
    long_image_size: int = option(256, "image side of the long-prefix model: (side / 16)^2 image tokens (256 -> 256)",
                                  at_least=16)
    threshold: list = option([0.9, 0.7], "confidence thresholds P of the threshold rows", nargs="+", type=float,
                             more_than=0, at_most=1)
    train_steps: int = option(5, "timed training steps of the --tiny preset (after one warm-up step)",
                              at_least=1)
    train_batch: int = option(32, "training batch size (the --tiny preset's)", at_least=1)
    matmul_size: int = option(2048, "side of the square float32 matmul that measures the machine's ceiling",
                              at_least=1)
    ckpt: str = option("", "bench this tiny checkpoint on shapes-world test scenes (scored) instead of random weights")
    threads: int = option(0, "torch threads (0: PyTorch's default)", at_least=0)
    seed: int = option(0, "seed of the random weights and images", at_least=0)
    json: str = option("", "also write every row as JSON to this file")


PRESETS = {"quick": {"help": "a smoke run in seconds: tiny sizes, one repeat (the numbers mean little)",
                     "values": dict(batch_sizes=[1, 2], tokens_per_step=[1, 8], gen_length=16, repeats=1,
                                    cache_batch=2, long_image_size=64, threshold=[0.9],
                                    train_steps=1,
                                    train_batch=4, matmul_size=256)}}


# ----------------------------------------------------------------------------------------------------------------
# The plain loop the sampler is compared with


@torch.no_grad()
def plain_loop(model, tokenizer, images, gen_length: int, steps: int, refine: bool = False):
    """LLaDA's reference loop written the plain way: every step runs the vision tower again, computes the logits of
    every position, and takes each confidence from a float64 softmax over the whole vocabulary. Same model, schedule
    and banned ids as caption_images, so at temperature 0 it must give the same ids. Returns (ids (B, G), passes)."""
    B = images.shape[0]
    prompt = torch.tensor(prompt_ids(tokenizer, model.n_image_tokens)).expand(B, -1)        # (B, P)
    P = prompt.shape[1]
    x = torch.cat([prompt, torch.full((B, gen_length), tokenizer.mask_id)], dim=1)           # (B, L)
    never = banned_ids(tokenizer) + [tokenizer.mask_id]
    counts = rediff.transfer_schedule(torch.full((B,), gen_length), steps)                   # (B, steps)
    for i in range(steps):
        logits = model(x, model.encode_images(images))                                       # (B, L, V)
        logits[:, :, never] = -torch.inf
        x0 = logits.argmax(dim=-1)                                                           # (B, L)
        probs = torch.softmax(logits.double(), dim=-1)                                       # (B, L, V) float64
        masked = x == tokenizer.mask_id                                                      # (B, L)
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


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers


def race(runs: dict, repeats: int) -> dict:
    """Time each zero-argument function `repeats` times, taking turns (a busy machine then slows all of them alike).
    Returns {name: (best seconds, its last result)}."""
    best, result = {}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            result[name] = fn()
            best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    return {name: (best[name], result[name]) for name in runs}


def matmul_rate(n: int, repeats: int = 3) -> float:
    """This machine's float32 matrix-multiply rate in FLOP/s: the best of a few (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    seconds = race({"mm": lambda: a @ b}, repeats)["mm"][0]
    return 2 * n ** 3 / seconds


def agreement(a, b) -> float:
    return (a == b).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs


def tiny_train_config(**changes):
    from train_stage1 import PRESETS as TRAIN_PRESETS, TrainConfig
    return dataclasses.replace(TrainConfig(**TRAIN_PRESETS["tiny"]["values"]), **changes)


def build(tokenizer, image_size: int, seed: int, prefix_dlm: bool = False):
    """A randomly initialised VLM of the --tiny shape; image_size / 16 patches a side (48 px: 9 image tokens);
    prefix_dlm: with the Prefix-DLM mask (train_stage1.py --prefix-dlm), under which the prefix cache is exact."""
    from train_stage1 import build_model
    torch.manual_seed(seed)
    return build_model(tiny_train_config(image_size=image_size, prefix_dlm=prefix_dlm), tokenizer).eval()


def inputs(model, batch: int, seed: int, world=None):
    """(images (B, 3, S, S), scenes or None): shapes-world test scenes with a checkpoint, random pixels without."""
    from data import shapes
    from data.pipeline import image_to_tensor
    vision = model.cfg.vision
    if world is None:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(batch, 3, vision.image_size, vision.image_size, generator=g) * 2 - 1, None
    samples = [shapes.sample("test", seed * 10_000 + i, world) for i in range(batch)]
    return image_to_tensor([s["image"] for s in samples], vision.mean, vision.std), [s["scene"] for s in samples]


def headline(tokenizer, ids, scenes) -> str:
    if scenes is None:
        return ""
    from data.score import score_captions
    return f"{score_captions([decode_answer(tokenizer, row) for row in ids], scenes)['headline']:.1f}"


# ----------------------------------------------------------------------------------------------------------------
# The three sections


def bench_sampler(model, tokenizer, cfg: BenchConfig, world) -> list[dict]:
    """Frozen and refining sampler at every batch size and tokens per step, and the plain loop (frozen) beside it."""
    rows = []
    G = cfg.gen_length
    for B in cfg.batch_sizes:
        images, scenes = inputs(model, B, cfg.seed, world)
        caption_images(model, tokenizer, images[:1], G, G)  # warm-up
        runs = {}
        for n in cfg.tokens_per_step:
            for refine in (False, True):
                runs[("sampler", n, refine)] = (lambda n=n, r=refine: caption_images(model, tokenizer, images, G, n, r))
            runs[("plain", n, False)] = lambda n=n: plain_loop(model, tokenizer, images, G, steps_for(G, n))
        timed = race(runs, cfg.repeats)
        for n in cfg.tokens_per_step:
            for kind, refine in (("sampler", False), ("sampler", True), ("plain", False)):
                seconds, (ids, passes) = timed[(kind, n, refine)]
                row = {"section": "sampler" if kind == "sampler" else "plain loop", "model": "tiny", "batch": B,
                       "tokens_per_step": n, "sampler": "refining" if refine else "frozen", "passes": passes,
                       "seconds": seconds, "score": headline(tokenizer, ids, scenes)}
                one = min(cfg.tokens_per_step)
                notes = [] if n == one else [f"wall {seconds / timed[(kind, one, refine)][0]:.3f} of {one} tok/step"]
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
    long-prefix shape (random weights; bidirectional, and with the Prefix-DLM mask), frozen and refining, with the
    plain loop beside the bidirectional long one (its vision tower is no longer small); then the confidence
    threshold on the tiny shapes."""
    rows = []
    G, B = cfg.gen_length, cfg.cache_batch
    one = min(cfg.tokens_per_step)
    configs = [("tiny", trained or build(tokenizer, 48, cfg.seed), world),
               ("long", build(tokenizer, cfg.long_image_size, cfg.seed), None),
               ("long prefix-dlm", build(tokenizer, cfg.long_image_size, cfg.seed, prefix_dlm=True), None)]
    for name, model, scenes_world in configs:
        images, scenes = inputs(model, B, cfg.seed, scenes_world)
        label = f"{name} ({model.n_image_tokens} img)"
        caption_images(model, tokenizer, images[:1], G, G, prefix_cache=True)  # warm-up
        for refine in (False, True):
            runs = {"off": lambda r=refine: caption_images(model, tokenizer, images, G, one, r)}
            if name == "long" and not refine:
                runs["plain"] = lambda: plain_loop(model, tokenizer, images, G, steps_for(G, one))
            runs["cache"] = lambda r=refine: caption_images(model, tokenizer, images, G, one, r,
                                                            prefix_cache=True)
            timed = race(runs, cfg.repeats)
            base_s, (base_ids, base_passes) = timed["off"]
            rows.append({"section": "no cache", "model": label, "batch": B, "tokens_per_step": one,
                         "sampler": "refining" if refine else "frozen", "passes": base_passes, "seconds": base_s,
                         "score": headline(tokenizer, base_ids, scenes), "ratio": "", "ids": ""})
            if "plain" in timed:
                seconds, (ids, passes) = timed["plain"]
                rows.append({"section": "plain loop", "model": label, "batch": B, "tokens_per_step": one,
                             "sampler": "frozen", "passes": passes, "seconds": seconds, "score": "",
                             "speedup_of_sampler": seconds / base_s, "ids_equal": bool(torch.equal(ids, base_ids)),
                             "ratio": f"sampler {seconds / base_s:.2f}x faster",
                             "ids": "equal" if torch.equal(ids, base_ids) else "DIFFER"})
            seconds, (ids, passes) = timed["cache"]
            rows.append({"section": "prefix cache", "model": label, "batch": B,
                         "tokens_per_step": one, "sampler": "refining" if refine else "frozen",
                         "passes": passes, "seconds": seconds,
                         "score": headline(tokenizer, ids, scenes),
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
            runs[f"threshold {p}"] = lambda r=refine, p=p: caption_images(model, tokenizer, images, G, one, r,
                                                                          threshold=p)
        timed = race(runs, cfg.repeats)
        base_s, (base_ids, _) = timed[one]
        for key, (seconds, (ids, passes)) in timed.items():
            if key == one:
                continue
            threshold = isinstance(key, str)
            rows.append({"section": key if threshold else "fixed schedule",
                         "model": configs[0][0] + f" ({model.n_image_tokens} img)", "batch": B,
                         "tokens_per_step": "-" if threshold else key,
                         "sampler": "refining" if refine else "frozen", "passes": passes, "seconds": seconds,
                         "score": headline(tokenizer, ids, scenes), "ratio": f"{base_s / seconds:.2f}x the speed of "
                         f"{one} tok/step", "ids": f"{100 * agreement(ids, base_ids):.1f}% same as {one} tok/step"})
    return rows


def training_flops(model, seq_len: int) -> float:
    """FLOPs of one training sample, counted as nanoGPT does: a weight used by one token costs 2 FLOPs forward and 4
    backward; attention costs 4 L^2 D per layer forward (QK^T and AV), x3 with the backward. The vision tower is
    frozen (forward only, N patches + the class token); the projector and the language model train."""
    lm = model.lm
    lm_weights = sum(p.numel() for p in lm.layers.parameters() if p.dim() == 2) + lm.lm_head.weight.numel()
    flops = 6 * lm_weights * seq_len + 3 * 4 * lm.cfg.n_layers * seq_len ** 2 * lm.cfg.d_model
    n = model.n_image_tokens
    flops += 6 * sum(p.numel() for p in model.mm_projector.parameters() if p.dim() == 2) * n
    visual, vision = model.vision_tower.visual, model.cfg.vision
    flops += 2 * visual.conv1.weight.numel() * n                                   # patch embedding
    tower = sum(p.numel() for p in visual.transformer.parameters() if p.dim() == 2)
    flops += 2 * tower * (n + 1) + 4 * vision.layers * (n + 1) ** 2 * vision.width
    return flops


def bench_training(tokenizer, cfg: BenchConfig, ceiling: float) -> list[dict]:
    """The --tiny training step (Stage I typed losses: corruption, forward, backward, clip, AdamW), data included."""
    from data import shapes
    from data.pipeline import ShapesData
    from train_stage1 import training_loss
    tcfg = tiny_train_config(batch_size=cfg.train_batch)
    torch.manual_seed(cfg.seed)
    from train_stage1 import build_model, freeze_vision
    model = build_model(tcfg, tokenizer)
    world = shapes.WorldConfig(image_size=tcfg.image_size, max_words=tcfg.answer_len - 1)
    data = ShapesData(tokenizer, world, "train", max(64, cfg.train_batch), model.n_image_tokens, tcfg.answer_len,
                      cfg.seed, model.cfg.vision.mean, model.cfg.vision.std)
    freeze_vision(model)
    model.train()
    model.vision_tower.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, betas=(0.9, 0.95), weight_decay=tcfg.weight_decay)

    def step(k):
        batch = data.batch(k, tcfg.batch_size, tcfg.hallucination_frac)
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
    return [{"section": "training step", "model": "tiny", "batch": tcfg.batch_size, "tokens_per_step": "-",
             "sampler": "-", "passes": "-", "seconds": seconds, "score": "",
             "tokens_per_s": tcfg.batch_size * seq_len / seconds, "flops_per_s": flops / seconds,
             "ratio": f"{tcfg.batch_size * seq_len / seconds:,.0f} tok/s; {flops / seconds / 1e9:.1f} GFLOP/s = "
                      f"{100 * flops / seconds / ceiling:.1f}% of the matmul rate", "ids": ""},
            {"section": "matmul ceiling", "model": f"fp32 {cfg.matmul_size}^3", "batch": "-", "tokens_per_step": "-",
             "sampler": "-", "passes": "-", "seconds": 2 * cfg.matmul_size ** 3 / ceiling, "score": "",
             "flops_per_s": ceiling, "ratio": f"{ceiling / 1e9:.1f} GFLOP/s", "ids": ""}]


# ----------------------------------------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    lines = ["| section | model | batch | tok/step | sampler | passes | ms/step | captions/s | score | ratio | ids |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_step = f"{1000 * r['seconds'] / r['passes']:.2f}" if isinstance(r["passes"], int) else "-"
        per_s = f"{r['batch'] / r['seconds']:.2f}" if isinstance(r["passes"], int) else "-"
        lines.append(f"| {r['section']} | {r['model']} | {r['batch']} | {r['tokens_per_step']} | {r['sampler']} "
                     f"| {r['passes']} | {per_step} | {per_s} | {r['score'] or '-'} | {r['ratio'] or '-'} "
                     f"| {r['ids'] or '-'} |")
    return "\n".join(lines)


def targets(rows: list[dict], one: int, eight: int) -> list[str]:
    """The issue's targets, each read off the rows above."""
    out = []
    overheads = [r["refine_overhead"] for r in rows if "refine_overhead" in r]
    if overheads:  # pooled: the same forward passes, so total refining time over total frozen time
        refining = sum(r["seconds"] for r in rows if "refine_overhead" in r)
        frozen = sum(r["seconds"] for r in rows if r["section"] == "sampler" and r["sampler"] == "frozen")
        pooled = refining / frozen - 1
        out.append(f"- refining costs <= 5% per step over frozen: {100 * pooled:+.1f}% pooled over the sampler rows "
                   f"(single rows {100 * min(overheads):+.1f}% to {100 * max(overheads):+.1f}%: timing noise) -> "
                   f"{'met' if pooled <= 0.05 else 'NOT met'}")
    walls = {(r["batch"], r["sampler"], r["tokens_per_step"]): r["seconds"] for r in rows if r["section"] == "sampler"}
    fractions = [walls[(b, s, eight)] / walls[(b, s, n)] for (b, s, n) in walls if n == one and (b, s, eight) in walls]
    if fractions and one != eight:
        worst = max(fractions)
        out.append(f"- {eight} tok/step wall <= 1/6 of {one} tok/step: worst 1/{1 / worst:.1f} -> "
                   f"{'met' if worst <= 1 / 6 else 'NOT met'}")
    plain = [r for r in rows if "speedup_of_sampler" in r]
    if plain:
        parts = []
        for model in dict.fromkeys(r["model"] for r in plain):
            s = [r["speedup_of_sampler"] for r in plain if r["model"] == model]
            parts.append(f"{model} {min(s):.2f}x to {max(s):.2f}x" if len(s) > 1 else f"{model} {s[0]:.2f}x")
        worst = min(r["speedup_of_sampler"] for r in plain)
        same = all(r["ids_equal"] for r in plain)
        out.append(f"- sampler >= 1.5x the plain loop: {'; '.join(parts)}; ids {'all equal' if same else 'DIFFER'} "
                   f"-> {'met' if worst >= 1.5 else 'met only where >= 1.5x'}")
    long = [r for r in rows if "cache_speedup" in r and r["model"].startswith("long")
            and r["section"] == "prefix cache"]
    if long:
        out.append("- prefix cache >= 2x on the long prefix: " + ", ".join(
            f"{r['model'].split(' (')[0]} {r['sampler']} {r['cache_speedup']:.2f}x "
            f"({100 * r['identical_tokens']:.1f}% identical tokens)"
            for r in long) + f" -> {'met' if min(r['cache_speedup'] for r in long) >= 2 else 'NOT met'}")
    return out


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
    start = time.perf_counter()
    trained, world = None, None
    if cfg.ckpt:
        from data import shapes
        from model import load_for
        trained, meta = load_for(cfg.ckpt, "--ckpt", needs=("tokenizer", "world", "answer_len"),
                                 fix="pass a checkpoint written by train_stage1.py or train_stage2.py")
        trained.eval()
        tokenizer, world = tokenizer_from_dict(meta["tokenizer"]), shapes.WorldConfig(**meta["world"])
        cfg.gen_length = meta["answer_len"]
    else:
        tokenizer = WordTokenizer.for_shapes_world()
    model = trained or build(tokenizer, 48, cfg.seed)
    weights = f"checkpoint {cfg.ckpt}" if cfg.ckpt else "random --tiny weights"
    print(f"bench: {weights}, {model.num_params() / 1e6:.2f} M parameters, {model.n_image_tokens} image tokens, "
          f"answer {cfg.gen_length} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    ceiling = matmul_rate(cfg.matmul_size)
    rows = bench_sampler(model, tokenizer, cfg, world)
    rows += bench_fast_dllm(tokenizer, cfg, trained, world)
    rows += bench_training(tokenizer, cfg, ceiling)
    print(markdown(rows))
    print("\n".join(targets(rows, min(cfg.tokens_per_step), max(cfg.tokens_per_step))))
    print(f"bench took {time.perf_counter() - start:.0f} s")
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    run_main(main)
