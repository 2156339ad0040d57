"""experiments/revisions.py: how much does the refining sampler revise inside the sentences that
end garbled? Exploratory.

Why Stage II might hurt fast decoding: the oracle rewrites a garbled sentence into one of many true
sentences of its length, and the refining sampler (Section 3.4) re-predicts each position of a
half-written sentence independently, so it may mix different rewrites and keep changing them. This
captions held-out test scenes (refining, trace on), splits each caption into sentences and reports,
for sentences that parse and those that do not (garbled), the revisions (visible tokens changed)
per step and per sentence, and the share of tokens changed two or more times (back and forth).

    python experiments/revisions.py --ckpt runs/repro/stage1-s0.safetensors \
        runs/repro/rediff-s0.safetensors
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from data import shapes  # noqa: E402
from data.pipeline import held_out_indices, image_to_tensor  # noqa: E402
from data.score import score_caption  # noqa: E402
from data.tokenizer import tokenizer_from_dict  # noqa: E402
from experiments.last_step import sentence_spans  # noqa: E402
from model import load_for  # noqa: E402
from sample import caption_images  # noqa: E402


@torch.no_grad()
def revision_stats(path: str, tokens_per_step: int, n: int, seed: int) -> dict:
    """{garbled | parses: {sentences, revisions per step and per sentence, share changed twice}}."""
    model, meta = load_for(path, "revisions.py --ckpt", needs=("tokenizer", "world", "answer_len"))
    model.eval()
    tokenizer, world = tokenizer_from_dict(meta["tokenizer"]), shapes.WorldConfig(**meta["world"])
    samples = [shapes.sample("test", i, world) for i in held_out_indices(n, seed)]
    vision = model.cfg.vision
    images = image_to_tensor([s["image"] for s in samples], vision.mean, vision.std)
    (ids, trace), _ = caption_images(model, tokenizer, images, meta["answer_len"], tokens_per_step,
                                     True, return_trace=True)
    changed = torch.stack([entry["changed"] for entry in trace])                       # (S, B, G)
    period = tokenizer.encode(".")[0]
    stats = {kind: {"sentences": 0, "tokens": 0, "revisions": 0, "twice": 0}
             for kind in ("garbled", "parses")}
    for row, sample in enumerate(samples):
        answer = ids[row].tolist()
        for a, b in sentence_spans(answer, period, tokenizer.eos_id):
            parses = score_caption(tokenizer.decode(answer[a:b]), sample["scene"])["syntax"] == 1.0
            s = stats["parses" if parses else "garbled"]
            per_token = changed[:, row, a:b].sum(dim=0)                                 # (b - a,)
            s["sentences"] += 1
            s["tokens"] += b - a
            s["revisions"] += int(per_token.sum())
            s["twice"] += int((per_token >= 2).sum())
    steps = len(trace)
    return {kind: {"sentences": s["sentences"],
                   "revisions per step": s["revisions"] / max(1, s["sentences"]) / steps,
                   "revisions per sentence": s["revisions"] / max(1, s["sentences"]),
                   "tokens changed twice or more": s["twice"] / max(1, s["tokens"])}
            for kind, s in stats.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", nargs="+", required=True, help="checkpoints to caption with")
    ap.add_argument("--tokens-per-step", type=int, default=8, help="tokens committed per step")
    ap.add_argument("--n", type=int, default=200, help="held-out test scenes")
    ap.add_argument("--seed", type=int, default=0, help="held-out scenes (tools/eval.py --seed)")
    args = ap.parse_args()
    print("| checkpoint | sentences | n | revisions per step | revisions per sentence "
          "| tokens changed >= 2x |")
    print("|---|---|---|---|---|---|")
    for path in args.ckpt:
        for kind, s in revision_stats(path, args.tokens_per_step, args.n, args.seed).items():
            print(f"| {os.path.basename(path)} | {kind} | {s['sentences']} "
                  f"| {s['revisions per step']:.3f} | {s['revisions per sentence']:.2f} "
                  f"| {s['tokens changed twice or more']:.1%} |")


if __name__ == "__main__":
    main()
