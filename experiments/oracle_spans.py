"""experiments/oracle_spans.py: how many of the oracle's corrected tokens does it actually
change? Exploratory.

Eq. 4 trains on every token of each corrected segment; a segment must occur once in the draft, so
it can hold unchanged words around the changed ones. This drafts captions of fresh training scenes
with a checkpoint (as train_stage2.py does), has the oracle rewrite them, and turns each rewrite
into pairs two ways: the smallest unique window around each run of changed words
(experts.pairs_from_rewrite) and the earlier rule that grew a window alternately right and left
until it was unique. It prints, per drafting speed, the corrected tokens, the share of them the
oracle changed, and the corrected tokens per draft.

    python experiments/oracle_spans.py --ckpt runs/repro/stage1-s0.safetensors --drafts 768
"""
import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import experts  # noqa: E402
from data import shapes  # noqa: E402
from data.pipeline import image_to_tensor  # noqa: E402
from data.tokenizer import tokenizer_from_dict  # noqa: E402
from model import load_for  # noqa: E402
from sample import caption_images, decode_answer  # noqa: E402
from train_stage2 import DRAFT_OFFSET  # noqa: E402


def grown_span(words: list[str], start: int, end: int) -> tuple[int, int]:
    """The earlier rule: widen [start, end) by a word, right then left in turn, until unique."""
    grow_right = True
    while len(experts.occurrences(words, words[start:end])) > 1:
        if (grow_right and end < len(words)) or start == 0:
            end += 1
        else:
            start -= 1
        grow_right = not grow_right
    return start, end


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="the drafting checkpoint (e.g. a Stage I model)")
    ap.add_argument("--drafts", type=int, default=768, help="drafts, spread over --tokens-per-step")
    ap.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 4, 8],
                    help="drafting speeds")
    args = ap.parse_args()
    model, meta = load_for(args.ckpt, "--ckpt", needs=("tokenizer", "world", "answer_len"))
    model.eval()
    tokenizer, world = tokenizer_from_dict(meta["tokenizer"]), shapes.WorldConfig(**meta["world"])
    vision = model.cfg.vision
    rules = {"smallest unique window": experts.smallest_unique_span,
             "grown right, then left": grown_span}
    stats = {(speed, rule): Counter() for speed in args.tokens_per_step for rule in rules}
    per_speed = args.drafts // len(args.tokens_per_step)
    for k, speed in enumerate(args.tokens_per_step):
        first = DRAFT_OFFSET + k * per_speed  # train_stage2.py's drafting scenes
        samples = [shapes.sample("train", first + i, world) for i in range(per_speed)]
        images = image_to_tensor([s["image"] for s in samples], vision.mean, vision.std)
        with torch.no_grad():
            ids, _ = caption_images(model, tokenizer, images, meta["answer_len"], speed, True)
        for row, sample in zip(ids, samples):
            words, fixed = rewrite(decode_answer(tokenizer, row), sample["scene"])
            for rule, span in rules.items():
                s = stats[(speed, rule)]
                s["drafts"] += 1
                for pair in experts.pairs_from_rewrite(words, fixed, span):
                    org, target = pair["org"].split(), pair["target"].split()
                    s["corrected"] += len(org)
                    s["changed"] += sum(a != b for a, b in zip(org, target))
    print("| tok/step | span rule | corrected tokens | changed by the oracle "
          "| corrected per draft |\n|---|---|---|---|---|")
    for (speed, rule), s in stats.items():
        changed = s["changed"] / max(1, s["corrected"])
        print(f"| {speed} | {rule} | {s['corrected']} | {changed:.1%} "
              f"| {s['corrected'] / max(1, s['drafts']):.2f} |")


def rewrite(draft: str, scene: dict) -> tuple[list[str], list[str]]:
    """The draft's words and the oracle's equal-length rewrite of them (the words themselves when
    right), caught where the oracle hands them to pairs_from_rewrite."""
    caught = {}
    real = experts.pairs_from_rewrite
    experts.pairs_from_rewrite = lambda words, fixed: caught.update(words=words, fixed=fixed) or []
    try:
        experts.OracleExpert().review_one(experts.Item(draft, "", scene, None))
    finally:
        experts.pairs_from_rewrite = real
    words = experts.normalise(draft)
    return caught.get("words", words), caught.get("fixed", words)


if __name__ == "__main__":
    main()
