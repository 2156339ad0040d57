"""experiments/fidelity.py: the choices between the paper's text and the official code,
measured. Exploratory.

Each comparison trains variants beside tools/reproduce.py's models (same --out folder, same shared
base, same budgets), evaluates them on the same held-out scenes and prints a table of headline
means ± half-range over the seeds:

    form       Stage I hallucination pairs as rows of their own (the official code) or on the
               tokens left visible after masking (the paper's text): stage1-rows-s{seed} vs
               stage1-visible-s{seed}
    baseline   the mask-trained baseline continued with the toy's word-class loss (--mask-loss
               balanced, the base's own) or with Eq. 1 proper: baseline-balanced-s{seed} vs
               baseline-eq1-s{seed}
    lr         Stage II at a tenth of Stage I's continuation rate (tools/reproduce.py --stage2-lr,
               the default) or at Stage I's own rate, as the official scripts train both stages
    drafts     Stage II from drafts at 1 and 2 tokens per step only, against the default 1 / 4 / 8
               (are the fast drafts too garbled for the expert to teach from?)

    python tools/reproduce.py                 # first: the shared base and the default models
    python experiments/fidelity.py form baseline lr drafts
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import reproduce  # noqa: E402
from tools.reproduce import ReproConfig, evaluate, mean_spread, pick, run  # noqa: E402


def variants(cfg: ReproConfig, which: str, seed: int) -> list[tuple[str, str, bool]]:
    """Train what `which` compares for one seed -> [(label, checkpoint, refine)], default first."""
    out = lambda name: os.path.join(cfg.out, name + ".safetensors")  # noqa: E731
    base = out("base")
    budget = ["--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
              "--warmup", str(cfg.warmup), "--n-scenes", str(cfg.n_scenes),
              "--eval-every", str(cfg.steps)]
    stage2 = ["train_stage2.py", "--tiny", "--init-from", out(f"stage1-s{seed}")]
    stage2_budget = ["--drafts-per-round", str(cfg.drafts), "--steps", str(cfg.stage2_steps),
                     "--batch-size", str(cfg.batch_size)]

    def train(name, argv):
        return run(cfg, name, argv + ["--out", out(name), "--seed", str(seed)], out(name))
    if which == "form":
        return [(f"{form} ({source})", train(f"stage1-{form}-s{seed}", [
            "train_stage1.py", "--tiny", "--objective", "revision", "--init-from", base,
            "--hallucination-form", form, *budget]), True)
            for form, source in (("rows", "official code"), ("visible", "paper text"))]
    if which == "baseline":
        return [(label, train(f"baseline-{loss}-s{seed}", [
            "train_stage1.py", "--tiny", "--objective", "mask", "--mask-loss", loss,
            "--init-from", base, *budget]), False)
            for loss, label in (("balanced", "word-class loss (balanced)"), ("eq1", "Eq. 1"))]
    if which == "lr":
        same = train(f"rediff-lr-stage1-s{seed}", [*stage2, "--lr", str(cfg.lr), *stage2_budget])
        return [(f"Stage II lr {cfg.stage2_lr:g} (the default)", out(f"rediff-s{seed}"), True),
                (f"Stage II lr {cfg.lr:g} (Stage I's, as the official scripts)", same, True)]
    if which == "drafts":
        slow = train(f"rediff-drafts12-s{seed}", [*stage2, "--lr", str(cfg.stage2_lr),
                                                  "--tokens-per-step", "1", "2", *stage2_budget])
        return [("drafts at 1 / 4 / 8", out(f"rediff-s{seed}"), True),
                ("drafts at 1 / 2", slow, True)]
    raise SystemExit(f"unknown comparison {which!r}: choose form, baseline, lr or drafts")


def compare(cfg: ReproConfig, which: str) -> list[str]:
    """Markdown lines: a row per variant, headline mean ± half-range over cfg.seeds per speed."""
    rows = {}
    for seed in cfg.seeds:
        for i, (label, ckpt, refine) in enumerate(variants(cfg, which, seed)):
            # tools/reproduce.py's evaluation
            both = i == 0 and seed == cfg.seeds[0] and which in ("lr", "drafts")
            sampler = "both" if both else "refine" if refine else "frozen"
            results = pick(evaluate(cfg, ckpt, sampler), refine)
            rows.setdefault((label, refine), []).append(results)
    tps = sorted(cfg.tokens_per_step)
    lines = [f"### {which} (headline, n = {cfg.n}, seeds {cfg.seeds})", "",
             "| variant | sampler | " + " | ".join(f"{n} tok/step" for n in tps) + " |",
             "|---|---|" + "---|" * len(tps)]
    for (label, refine), runs in rows.items():
        cells = [mean_spread([r[n]["headline"] for r in runs]) for n in tps]
        sampler = "refining" if refine else "frozen"
        lines.append(f"| {label} | {sampler} | " + " | ".join(cells) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="+", choices=["form", "baseline", "lr", "drafts"])
    parser.add_argument("--out", default=ReproConfig.out,
                        help="tools/reproduce.py's folder (its base is reused)")
    args = parser.parse_args()
    cfg = ReproConfig(out=args.out)
    if not os.path.exists(os.path.join(cfg.out, "base.safetensors.done")):
        raise SystemExit(f"{cfg.out} has no finished base model: "
                         f"run python tools/reproduce.py first")
    for sub in ("logs", "eval"):
        os.makedirs(os.path.join(cfg.out, sub), exist_ok=True)
    for which in args.which:
        print("\n".join(compare(cfg, which)) + "\n", flush=True)


if __name__ == "__main__":
    reproduce.os.environ.setdefault("TQDM_DISABLE", "1")
    main()
