"""experiments/errors.py: what do a checkpoint's captions get wrong? Exploratory (not the method).

Two analyses on tools/eval.py's held-out scenes, one after the other:
    the grounding probe   does the model read the image? In a true caption of each scene only the
                          words of one attribute (colour, shape, size or position) are masked, and
                          the argmax accuracy on them is measured with the scene's own image tokens
                          and with the next scene's: equal accuracies mean the image is ignored.
    false object claims   the captions of tools/eval.py's evaluation, their false object claims by
                          kind (data.score.FALSE_OBJECT_KINDS: an object at another object's cell,
                          wrong attributes, ...) and, per sentence template, false / written.

    python experiments/errors.py --ckpt out/stage1.safetensors
    python experiments/errors.py --ckpt out/base.safetensors out/stage1.safetensors \\
        --tokens-per-step 1 8 --both --no-probe
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import UsageError, option, parse_config, run_main  # noqa: E402
from data import shapes  # noqa: E402
from data.pipeline import SCENE_POOL, answer_ids, held_out_indices, image_to_tensor  # noqa: E402
from data.pipeline import prompt_ids  # noqa: E402
from data.score import FALSE_OBJECT_KINDS  # noqa: E402
from data.tokenizer import tokenizer_from_dict  # noqa: E402
from model import load_for, pick_device  # noqa: E402
from tools.eval import NEEDS, evaluate  # noqa: E402


@dataclass
class ErrorsConfig:
    ckpt: list = option(None, "one or more checkpoints", nargs="+", type=str)
    tokens_per_step: list = option([1, 8], "tokens committed per step of the captions",
                                   nargs="+", type=int, at_least=1)
    both: bool = option(False, "caption with both samplers (else the refining one)")
    n: int = option(200, "held-out test scenes", at_least=1, at_most=SCENE_POOL)
    seed: int = option(0, "which held-out scenes are drawn (tools/eval.py --seed)", at_least=0)
    batch_size: int = option(100, "captions decoded together", at_least=1)
    device: str = option("auto", "auto, cpu, cuda or mps")
    probe: bool = option(True, "run the grounding probe")
    claims: bool = option(True, "caption the scenes and count their false object claims by kind")


@torch.no_grad()
def grounding_probe(model, tokenizer, world, answer_len: int, indices) -> dict:
    """Not in the paper: does the model read the image? In a true caption of each held-out scene,
    mask only the words of one attribute (colour, shape, size or position; everything else stays
    visible) and measure argmax accuracy, with the scene's own image tokens and with the next
    scene's. Equal accuracies mean the model ignores the image for that attribute. A group whose
    words are not one token each (e.g. two-word positions of older worlds) is left out."""
    vision = model.cfg.vision
    samples = [shapes.sample("test", i, world) for i in indices]
    images = image_to_tensor([s["image"] for s in samples], vision.mean, vision.std)
    device = next(model.parameters()).device
    prompt = prompt_ids(tokenizer, model.n_image_tokens)
    ids = torch.tensor([prompt + answer_ids(tokenizer, s["caption"], answer_len) for s in samples],
                       device=device)                                                  # (B, L)
    own = model.encode_images(images.to(device))                                       # (B, N, D)
    result = {}
    for name, words in (("colour", shapes.COLOURS), ("shape", shapes.SHAPES),
                        ("size", shapes.SIZES), ("position", shapes.POSITIONS)):
        if any(len(tokenizer.encode(w)) != 1 for w in words):
            continue
        targets = torch.tensor([tokenizer.encode(w)[0] for w in words], device=device)
        hidden = torch.isin(ids, targets)                                              # (B, L)
        hidden[:, :len(prompt)] = False
        masked = ids.masked_fill(hidden, tokenizer.mask_id)
        for which, embeds in (("own image", own), ("next scene's image", own.roll(1, dims=0))):
            guess = model(masked, embeds).argmax(-1)                                    # (B, L)
            result[f"{name} ({which})"] = (guess[hidden] == ids[hidden]).float().mean().item()
        result[f"{name} (chance)"] = 1 / len(words)
    return result


def false_claims_text(rows: list[dict]) -> str:
    """Not in the paper: the false object claims of evaluation rows (tools/eval.py's evaluate) by
    kind, and per sentence template the object sentences written and how many were false."""
    def name(r: dict) -> str:
        sampler = "refine" if r["refine"] else "frozen"
        return f"{os.path.basename(r['ckpt'])}, {r['tokens_per_step']} tok/step, {sampler}"

    lines = ["false object claims (total over the captions):"]
    for r in rows:
        counts = ", ".join(f"{k} {v}" for k, v in r["false_objects"].items())
        lines.append(f"  {name(r)}: {counts}")
    lines.append("  where " + "; ".join(f"{k} = {v}" for k, v in FALSE_OBJECT_KINDS.items()))
    lines.append("object sentences per template, false / written:")
    for r in rows:
        counts = "; ".join(f"{t.replace('{size} {colour} {shape}', '...')} {bad}/{n}"
                           for t, (n, bad) in r["object_templates"].items())
        lines.append(f"  {name(r)}: {counts}")
    return "\n".join(lines)


def main(argv=None):
    cfg = parse_config(ErrorsConfig, argv, description=__doc__)
    if not cfg.ckpt:
        raise UsageError("experiments/errors.py: give at least one checkpoint with --ckpt")
    device = pick_device(cfg.device)
    indices = held_out_indices(cfg.n, cfg.seed)
    rows = []
    for ckpt in cfg.ckpt:
        model, meta = load_for(ckpt, "--ckpt", needs=NEEDS, device=device)
        model.eval()
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        world = shapes.WorldConfig(**meta["world"])
        if cfg.probe:
            probe = grounding_probe(model, tokenizer, world, meta["answer_len"], indices)
            print(f"{ckpt}: " + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()))
        if cfg.claims:
            for n in cfg.tokens_per_step:
                for refine in ([True, False] if cfg.both else [True]):
                    scores = evaluate(model, tokenizer, world, meta["answer_len"], indices, n,
                                      refine, cfg.batch_size)
                    rows.append({"ckpt": ckpt, "tokens_per_step": n, "refine": refine, **scores})
    if rows:
        print(false_claims_text(rows))
    return rows


if __name__ == "__main__":
    run_main(main)
