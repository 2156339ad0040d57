"""tools/eval.py: score checkpoints on held-out shapes-world scenes at several tokens per step,
frozen and refining.

    python tools/eval.py --ckpt out/stage1.safetensors --both --json out/eval.json
    python -m tools.eval --ckpt out/base.safetensors --tokens-per-step 1 8 --no-refine
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)

from cli import UsageError, check_writable, option, parse_config, run_main  # noqa: E402
from data.pipeline import SCENE_POOL, held_out_indices  # noqa: E402

NEEDS = ("tokenizer", "world", "answer_len")  # checkpoint metadata read here (load_for: if missing)
SAMPLER = {True: "refine", False: "frozen"}  # a result's "refine" -> the sampler's name


@dataclass
class EvalConfig:
    ckpt: list = option(None, "one or more checkpoints", nargs="+", type=str)
    tokens_per_step: list = option([1, 2, 4, 8], "tokens committed per step (steps = "
                                   "ceil(gen_length / n))", nargs="+", type=int, at_least=1)
    refine: bool = option(True, "evaluate the refining sampler; --no-refine: the frozen one")
    both: bool = option(False, "evaluate both samplers (overrides --refine)")
    n: int = option(200, "held-out test scenes", at_least=1, at_most=SCENE_POOL)
    seed: int = option(0, "which held-out scenes are drawn", at_least=0)
    batch_size: int = option(100, "captions decoded together", at_least=1)
    json: str = option("", "write results here (also .md table and .png plot beside it)")
    device: str = option("auto", "auto, cpu, cuda or mps")
    prefix_cache: bool = option(False, "reuse the image + prompt keys/values within a block "
                                "(approximate; sample.py)")
    threshold: float = option(0.0, "confidence-threshold decoding (Fast-dLLM); 0: the fixed "
                              "tokens-per-step schedule", at_least=0, at_most=1)
    block_length: int = option(0, "semi-autoregressive block length, dividing the answer length "
                               "(0: one block, as in the paper)", at_least=0)
    compile: bool = option(False, "torch.compile the model for captioning (about 30 s up front per "
                           "checkpoint; same outputs; 1.2-1.35x faster on 2 CPU cores)")


def caption_steps(trace: list, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per answer (B,): how many sampler steps committed a word of its final caption (the positions
    before its first end-of-text). Low-confidence decoding commits the end-of-text padding first
    (the surest tokens), so a short caption takes fewer steps than the sampler (at 8 tokens per
    step the toy's ~20-word captions are written in about 4 of the 6 steps)."""
    is_eos = ids == eos_id                                                             # (B, G)
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1])  # (B,) caption words
    words = torch.arange(ids.shape[1], device=ids.device) < length[:, None]            # (B, G)
    new = torch.stack([entry["new"] for entry in trace])                               # (S, B, G)
    return (new & words).any(-1).sum(0)                                                # (B,)


@torch.no_grad()
def evaluate(model, tokenizer, world, answer_len: int, indices, tokens_per_step: int, refine: bool,
             batch_size: int = 100, **sampler) -> dict:
    """Per caption over the test scenes `indices`: mean scorer metrics, forward passes, revisions
    (visible tokens changed; 0 frozen) and caption_steps. sampler: caption_images' options."""
    from data import shapes
    from data.pipeline import image_to_tensor
    from data.score import score_captions
    from sample import caption_images, decode_answer
    vision = model.cfg.vision
    texts, scenes, passes, revised, written_in = [], [], 0, 0, 0
    for lo in range(0, len(indices), batch_size):
        samples = [shapes.sample("test", i, world) for i in indices[lo:lo + batch_size]]
        images = image_to_tensor([s["image"] for s in samples], vision.mean, vision.std)
        (ids, trace), calls = caption_images(model, tokenizer, images, answer_len, tokens_per_step,
                                             refine, return_trace=True, **sampler)
        texts += [decode_answer(tokenizer, row) for row in ids]
        scenes += [s["scene"] for s in samples]
        passes += calls * len(samples)
        revised += sum(int(step["changed"].sum()) for step in trace)  # visible tokens changed
        written_in += int(caption_steps(trace, ids, tokenizer.eos_id).sum())
    scores = score_captions(texts, scenes)
    scores["forward_passes"] = passes / len(texts)
    scores["revisions"] = revised / len(texts)
    scores["caption_steps"] = written_in / len(texts)
    scores["words"] = sum(len(t.split()) for t in texts) / len(texts)  # up to the end-of-text
    scores["examples"] = texts[:3]
    return scores


def markdown_table(results: list[dict]) -> str:
    lines = ["| ckpt | tokens/step | sampler | headline | factuality | coverage | syntax "
             "| repetition | passes | words | revisions | caption steps |", "|---" * 12 + "|"]
    for r in results:
        lines.append(f"| {os.path.basename(r['ckpt'])} | {r['tokens_per_step']} "
                     f"| {SAMPLER[r['refine']]} | {r['headline']:.1f} | {r['factuality']:.3f} "
                     f"| {r['coverage']:.3f} | {r['syntax']:.3f} | {r['repetition']:.3f} "
                     f"| {r['forward_passes']:.0f} | {r.get('words', 0):.1f} "
                     f"| {r.get('revisions', 0):.2f} | {r.get('caption_steps', 0):.2f} |")
    return "\n".join(lines)


def plot_png(results: list[dict], path: str) -> None:
    """Headline score vs tokens per step, one line per (checkpoint, sampler), drawn with Pillow."""
    from PIL import Image, ImageDraw
    W, H, left, bottom, top, right = 640, 420, 60, 50, 20, 200
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    xs = sorted({r["tokens_per_step"] for r in results})
    to_px = lambda i, y: (left + (W - left - right) * (i / max(1, len(xs) - 1)),  # noqa: E731
                          H - bottom - (H - top - bottom) * y / 100)
    draw.line([to_px(0, 0), to_px(len(xs) - 1, 0)], fill="black")
    draw.line([to_px(0, 0), to_px(0, 100)], fill="black")
    for y in range(0, 101, 20):
        draw.text((left - 30, to_px(0, y)[1] - 6), str(y), fill="black")
    for i, x in enumerate(xs):
        draw.text((to_px(i, 0)[0] - 4, H - bottom + 8), str(x), fill="black")
    draw.text((W // 2 - 80, H - 22), "tokens per step (headline score)", fill="black")
    colours = "#1f77b4 #d62728 #2ca02c #ff7f0e #9467bd #8c564b #e377c2 #7f7f7f".split()
    lines = {}
    for r in results:
        lines.setdefault((os.path.basename(r["ckpt"]), r["refine"]), []).append(r)
    for k, ((name, refine), rows) in enumerate(lines.items()):
        colour = colours[k % len(colours)]
        rows = sorted(rows, key=lambda r: r["tokens_per_step"])
        points = [to_px(xs.index(r["tokens_per_step"]), r["headline"]) for r in rows]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for px, py in points:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((W - right + 10, top + 18 * k), f"{name} ({SAMPLER[refine]})", fill=colour)
    img.save(path)


def main(argv=None):
    cfg = parse_config(EvalConfig, argv, description=__doc__)
    if not cfg.ckpt:
        raise UsageError("tools/eval.py: give at least one checkpoint with --ckpt")
    check_writable(cfg.json, "--json")
    from data import shapes
    from data.tokenizer import tokenizer_from_dict
    from checkpoints import load_for
    from model import pick_device
    from sample import check_block_length
    device = pick_device(cfg.device)
    indices = held_out_indices(cfg.n, cfg.seed)
    if cfg.block_length:  # every checkpoint's answer length, before any evaluation starts
        for ckpt in cfg.ckpt:
            _, meta = load_for(ckpt, "--ckpt", needs=NEEDS)
            check_block_length(cfg.block_length, meta["answer_len"], f"{ckpt}'s answer")
    modes = [True, False] if cfg.both else [cfg.refine]
    results, start = [], time.perf_counter()
    jobs = [(c, n, r) for c in cfg.ckpt for n in cfg.tokens_per_step for r in modes]
    loaded = {}
    for ckpt, n, refine in tqdm(jobs, desc="eval", dynamic_ncols=True):
        if ckpt not in loaded:
            model, meta = load_for(ckpt, "--ckpt", needs=NEEDS, device=device)
            loaded = {ckpt: (torch.compile(model.eval()) if cfg.compile else model.eval(), meta)}
        model, meta = loaded[ckpt]
        sampler = {"prefix_cache": cfg.prefix_cache, "threshold": cfg.threshold or None,
                   "block_length": cfg.block_length or None}
        world = shapes.WorldConfig(**meta["world"])
        scores = evaluate(model, tokenizer_from_dict(meta["tokenizer"]), world, meta["answer_len"],
                          indices, n, refine, cfg.batch_size, **sampler)
        results.append({"ckpt": ckpt, "tokens_per_step": n, "refine": refine, **sampler, **scores})
    table = markdown_table(results)
    print(table)
    if cfg.prefix_cache or cfg.threshold or cfg.block_length:
        print(f"sampler options: prefix cache {cfg.prefix_cache}, threshold "
              f"{cfg.threshold or 'none'}, block length {cfg.block_length or 'one block'}")
    print(f"{len(jobs)} evaluations of {cfg.n} scenes in {time.perf_counter() - start:.0f} s")
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump({"results": results, "n": cfg.n, "seed": cfg.seed}, f, indent=1)
        stem = os.path.splitext(cfg.json)[0]
        with open(stem + ".md", "w") as f:
            f.write(table + "\n")
        plot_png(results, stem + ".png")
    return results


if __name__ == "__main__":
    run_main(main)
