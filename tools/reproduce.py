"""tools/reproduce.py: one command that trains every model behind the paper's findings F1-F6 from
one shared base model, evaluates them on held-out shapes-world scenes and writes one report
(REPORT.md, the plot f1.png; each evaluation's JSON in eval/) and the results page (docs/results.md:
the report under one line naming the command that wrote it).

    python tools/reproduce.py            # the full run (about 22 min on 2 CPU cores)
    python tools/reproduce.py --quick    # a smaller run with the same structure (about 8 min)

Every model is one ordinary command (train_stage1.py, train_stage2.py, tools/eval.py), printed
before it runs and logged to <out>/logs/. The run is resumable: a model whose checkpoint is marked
done is not trained again, an interrupted one continues with --resume, and evaluations already in
<out>/eval/ are reused. All continuations start from the same base model (mask objective); the
Stage I and mask continuations get the same optimizer steps, samples and learning rate (--steps x
--batch-size, --lr), and every Stage II round --stage2-steps x --batch-size at --stage2-lr.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)

from cli import (check_folder_out, check_writable, option, parse_config, run_main,  # noqa: E402
                 show_config)

EVAL_SCENE_POOL = 100_000  # data.pipeline.SCENE_POOL (not imported: torch stays out of --help)


@dataclass
class ReproConfig:
    out: str = option("runs/repro", "folder (not a checkpoint: the training scripts' --out) for "
                      "checkpoints, logs, evaluations and the report")
    base_steps: int = option(3000, "steps of the shared base model (train_stage1.py --tiny "
                             "--objective mask)", at_least=1)
    steps: int = option(600, "optimizer steps of every Stage I / mask continuation from the base "
                        "(equal budgets)", at_least=1)
    batch_size: int = option(32, "samples per step of every continuation (Stage I and II alike)",
                             at_least=1)
    lr: float = option(1e-3, "peak learning rate of the Stage I / mask continuations (the base "
                       "ends at 2e-4)", more_than=0)
    warmup: int = option(20, "warm-up steps of the Stage I / mask continuations", at_least=0)
    n_scenes: int = option(3000, "pre-rendered training scenes of every Stage I / mask "
                           "continuation (train_stage1.py --n-scenes; a fresh caption per draw; "
                           "the base renders --tiny's 10000)", at_least=1)
    drafts: int = option(3072, "Stage II drafts per round (train_stage2.py --drafts-per-round); "
                         "with --stage2-steps x --batch-size x 3/4 own drafts per round, about one "
                         "epoch (the paper: one epoch)", at_least=1)
    stage2_steps: int = option(120, "optimizer steps of every Stage II round", at_least=1)
    stage2_lr: float = option(1e-4, "peak learning rate of every Stage II round (a tenth of --lr: "
                              "the official scripts use one rate for both stages, but here --lr "
                              "scored lower at every speed: docs/findings.md)",
                              more_than=0)
    seeds: list = option([0, 1, 2], "seeds of the headline comparison (F1): baseline and ReDiff "
                         "trained once per seed", nargs="+", type=int, at_least=0)
    tokens_per_step: list = option([1, 2, 4, 8], "tokens per step evaluated (F1 / F2 / F4 models "
                                   "at all of them; the F3 / F5 / F6 variants at the slowest and "
                                   "the fastest)", nargs="+", type=int, at_least=1)
    n: int = option(200, "held-out test scenes per evaluation", at_least=1,
                    at_most=EVAL_SCENE_POOL)
    eval_seed: int = option(0, "which held-out scenes are drawn (tools/eval.py --seed)",
                            at_least=0)
    device: str = option("auto", "auto (cuda, mps, cpu), cpu, cuda or mps")
    results_page: str = option("docs/results.md", "also write the report here as the results "
                               "page, under a line naming this command (empty: don't; --quick: "
                               "empty)")


PRESETS = {"quick": {"help": "a smaller run with the same structure (about 8 min on 2 CPU cores)",
                     "values": dict(base_steps=1000, steps=200, n_scenes=2000, drafts=768,
                                    stage2_steps=40, seeds=[0, 1], tokens_per_step=[1, 8], n=60,
                                    results_page="")}}

PY = sys.executable
STAGE2_WARMUP = 10  # train_stage2.py's default warm-up, also given to the equal-steps control
CONTROL_SEED_OFFSET = 1000  # the control's --seed: batches unlike its Stage I run's


# --------------------------------------------------------------------------------------------------
# Running the ordinary scripts, resumably


def run(cfg: ReproConfig, name: str, argv: list[str], ckpt: str, resumable: bool = True) -> str:
    """Run one training command (argv[0]: a script, a repository path such as train_stage1.py)
    unless `ckpt` is already marked done; an interrupted run continues with --resume. Not in the
    paper: the bookkeeping of one command for every model."""
    done = ckpt + ".done"
    if os.path.exists(done):
        print(f"[{name}] done already: {ckpt}")
        return ckpt
    if resumable and os.path.exists(ckpt):
        argv = argv + ["--resume"]
    log = os.path.join(cfg.out, "logs", name + ".log")
    script = os.path.join(ROOT, argv[0])  # from any working folder; an absolute argv[0] stays
    command = [PY, script] + argv[1:] + ["--device", cfg.device]
    shown = [os.path.relpath(script)] + command[2:]
    print(f"[{name}] {' '.join(shown)}  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "TQDM_DISABLE": "1"})
    if code != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        raise SystemExit(f"[{name}] failed with exit code {code}; the end of {log}:\n{tail}\n"
                         f"Fix the cause and rerun tools/reproduce.py: finished models are kept.")
    with open(done, "w") as f:
        f.write(f"{time.perf_counter() - start:.1f}\n")
    print(f"[{name}] finished in {time.perf_counter() - start:.0f} s", flush=True)
    return ckpt


SAMPLER_FLAGS = {"both": ["--both"], "refine": [], "frozen": ["--no-refine"]}


def evaluate(cfg: ReproConfig, ckpt: str, sampler: str, ends_only: bool = False) -> list[dict]:
    """tools/eval.py on one checkpoint with sampler both / refine / frozen, cached as
    <out>/eval/<name>-<sampler>.json; ends_only: at the slowest and the fastest tokens per step
    only (the ablation rows, to keep the run short).
    The paper's evaluation at 1-8 tokens per step (Tables 2-3), on the toy's scorer."""
    name = os.path.splitext(os.path.basename(ckpt))[0] + "-" + sampler
    path = os.path.join(cfg.out, "eval", name + ".json")
    ends = sorted({min(cfg.tokens_per_step), max(cfg.tokens_per_step)})
    speeds = ends if ends_only else cfg.tokens_per_step
    if not os.path.exists(path):
        command = [PY, "tools/eval.py", "--ckpt", ckpt, "--tokens-per-step", *map(str, speeds),
                   "--n", str(cfg.n), "--seed", str(cfg.eval_seed), "--json", path,
                   "--device", cfg.device, *SAMPLER_FLAGS[sampler]]
        print(f"[eval {name}] {' '.join(command[1:])}", flush=True)
        os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported
        # run in this process (~10 s of start-up saved per evaluation); torch stays out of --help
        from tools import eval as eval_script
        with open(os.path.join(cfg.out, "logs", f"eval-{name}.log"), "w") as f:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                try:
                    eval_script.main(command[2:])
                except SystemExit as err:
                    raise SystemExit(f"[eval {name}] failed: {err}; see {f.name}") from None
    with open(path) as f:
        return json.load(f)["results"]


# --------------------------------------------------------------------------------------------------
# The models


def train_all(cfg: ReproConfig) -> dict:
    """Every checkpoint of the report, by role -> path."""
    out = lambda name: os.path.join(cfg.out, name + ".safetensors")  # noqa: E731
    budget = ["--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
              "--warmup", str(cfg.warmup)]
    stage2_budget = ["--steps", str(cfg.stage2_steps), "--batch-size", str(cfg.batch_size),
                     "--lr", str(cfg.stage2_lr)]
    scenes = ["--n-scenes", str(cfg.n_scenes)]

    def continued(name: str, objective: str, init: str, seed: int, eval_every: int, *flags) -> str:
        """train_stage1.py from `init`; objective: "mask" or "revision", then its own flags."""
        return run(cfg, name, ["train_stage1.py", "--tiny", "--objective", *objective.split(),
                               "--init-from", init, "--out", out(name), "--seed", str(seed),
                               "--eval-every", str(eval_every), *flags], out(name))
    stage1 = lambda name, seed, *flags: continued(  # noqa: E731
        name, "revision", base, seed, cfg.steps, *budget, *scenes, *flags)
    stage2 = lambda name, seed, *start: run(cfg, name, [  # noqa: E731
        "train_stage2.py", "--tiny", *start, "--out", out(name), "--seed", str(seed),
        "--drafts-per-round", str(cfg.drafts), *stage2_budget], out(name))
    base = run(cfg, "base", ["train_stage1.py", "--tiny", "--objective", "mask", "--steps",
                             str(cfg.base_steps), "--out", out("base")], out("base"))
    ckpts = {"base": base}
    for seed in cfg.seeds:
        # the mask-trained baseline: Eq. 1 proper (the base itself: --tiny's word-class loss)
        ckpts[f"baseline-s{seed}"] = continued(f"baseline-s{seed}", "mask --mask-loss eq1", base,
                                               seed, cfg.steps, *budget, *scenes)
        stage1_ckpt = ckpts[f"stage1-s{seed}"] = stage1(f"stage1-s{seed}", seed)
        ckpts[f"rediff-s{seed}"] = stage2(f"rediff-s{seed}", seed, "--init-from", stage1_ckpt)
        ckpts[f"stage2-alone-s{seed}"] = stage2(f"stage2-alone-s{seed}", seed, "--init-from", base)
        # the equal-steps control: Stage I continued for Stage II's steps, batch, rate; new batches
        ckpts[f"stage1-more-s{seed}"] = continued(
            f"stage1-more-s{seed}", "revision", stage1_ckpt, CONTROL_SEED_OFFSET + seed,
            cfg.stage2_steps, "--warmup", str(STAGE2_WARMUP), *stage2_budget, *scenes)
    seed = cfg.seeds[0]
    # round 2: a copy of round 1's run, resumed with --rounds 2 (fresh drafts of the improved model)
    round2 = out("rediff-round2")
    if not os.path.exists(round2 + ".done") and not os.path.exists(round2):
        shutil.copyfile(ckpts[f"rediff-s{seed}"], round2)
    ckpts["rediff-round2"] = stage2("rediff-round2", seed, "--rounds", "2")
    for name, flags in [("t-dependent", "--t-dependent"), ("syntax-only", "--hallucination-frac 0"),
                        ("hallucination-only", "--replace-prob 0")]:  # the ablations
        ckpts[f"stage1-{name}"] = stage1(f"stage1-{name}", seed, *flags.split())
    return ckpts


# --------------------------------------------------------------------------------------------------
# The report

METRICS = ("headline", "factuality", "coverage", "syntax", "repetition")


def pick(results: list[dict], refine: bool) -> dict:
    """tokens_per_step -> result row, for one sampler."""
    return {r["tokens_per_step"]: r for r in results if r["refine"] == refine}


def mean_spread(values: list[float]) -> str:
    mean, half_range = sum(values) / len(values), (max(values) - min(values)) / 2
    return f"{mean:.1f} ± {half_range:.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(rows: list[tuple], tps: list[int], metrics=("headline", "syntax")) -> list[str]:
    """A markdown table: one row per (model, metric), one column per tokens per step."""
    lines = ["| model | metric | " + " | ".join(f"{n} tok/step" for n in tps) + " |",
             "|---|---|" + "---|" * len(tps)]
    for label, by_tps in rows:
        for metric in metrics:
            digits = 1 if metric == "headline" else 3  # "–": not evaluated at this speed
            cells = ["–" if n not in by_tps else f"{by_tps[n][metric]:.{digits}f}" for n in tps]
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    return lines


def keep_ratio(by_tps: dict, tps: list[int], metric: str = "headline") -> float:
    """Score at the fastest speed / at the slowest (the F1 criterion); 0 when the slow one is 0."""
    slow, fast = by_tps[min(tps)][metric], by_tps[max(tps)][metric]
    return fast / slow if slow > 0 else 0.0


def report(cfg: ReproConfig, ckpts: dict, start: float) -> str:
    """REPORT.md's text: the paper's Tables 2-6 and Figure 5 on the toy (F1-F6); runs the
    evaluations it needs (cached). start: perf_counter() at this invocation's start."""
    tps, seeds = sorted(cfg.tokens_per_step), cfg.seeds
    ev = lambda role, sampler: evaluate(cfg, ckpts[role], sampler)  # noqa: E731
    ends = lambda role: pick(evaluate(cfg, ckpts[role], "refine", True), True)  # noqa: E731
    s0 = seeds[0]
    baseline = {s: pick(ev(f"baseline-s{s}", "both" if s == s0 else "frozen"), False)
                for s in seeds}
    rediff = {s: pick(ev(f"rediff-s{s}", "both" if s == s0 else "refine"), True) for s in seeds}
    stage1 = {s: pick(ev(f"stage1-s{s}", "both" if s == s0 else "refine"), True) for s in seeds}
    f1_rows = (("mask-trained baseline (Eq. 1)", baseline), ("ReDiff", rediff),
               ("Stage I alone", stage1))
    lo, hi = min(tps), max(tps)
    speeds = " | ".join(f"{n} tok/step" for n in tps)        # the header cells, one per speed
    kept_header = ["| model | " + speeds + f" | kept at {hi} ({hi} / {lo}) |",
                   "|---|" + "---|" * (len(tps) + 1)]
    lines = [f"# Reproduction report (shapes world, n = {cfg.n} held-out scenes, "
             f"eval seed {cfg.eval_seed})", "",
             f"Config: `{json.dumps(asdict(cfg))}`.", "WALL", "",
             "## F1 / F2 (paper Tables 2-3): mask-trained baseline (frozen sampler) vs ReDiff "
             "(Stage I + II, refining sampler; and Stage I alone, refining), mean ± half-range "
             f"over seeds {seeds}"]
    for metric in ("headline", "syntax"):
        scale = 1 if metric == "headline" else 100  # syntax as a percentage, like the headline
        what = " (sentences that parse, %)" if metric == "syntax" else ""
        lines += ["", f"{metric}{what}:", "", *kept_header]
        for label, runs in f1_rows:
            cells = [mean_spread([scale * runs[s][n][metric] for s in seeds]) for n in tps]
            kept = [100 * keep_ratio(runs[s], tps, metric) for s in seeds]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean_spread(kept)} % |")
    lines += ["", "Steps that wrote a word of the caption (tools/eval.py's caption steps; "
              "end-of-text padding is committed first, so a short caption takes fewer steps than "
              "the answer), mean over the seeds:", "",
              "| model | " + speeds + " |", "|---|" + "---|" * len(tps)]
    for label, runs in f1_rows:
        # nan: an evaluation cached by an older tools/eval.py, without caption steps
        cells = [sum(runs[s][n].get("caption_steps", math.nan) for s in seeds) / len(seeds)
                 for n in tps]
        lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    faster = [n for n in tps if n != lo]
    lines += ["", f"Kept of the {lo}-token headline (%), mean ± half-range over seeds; the gap is "
              "ReDiff's keep minus the baseline's, seed by seed:", "",
              "| model | " + " | ".join(f"{n} tok/step" for n in faster) + " |",
              "|---|" + "---|" * (len(tps) - 1)]

    def kept_at(runs: dict, s: int, n: int) -> float:
        return 100 * runs[s][n]["headline"] / max(runs[s][lo]["headline"], 1e-9)

    for label, runs in (("mask-trained baseline (Eq. 1, frozen)", baseline), ("ReDiff", rediff),
                        ("Stage I alone", stage1)):
        lines.append(f"| {label} | " + " | ".join(
            mean_spread([kept_at(runs, s, n) for s in seeds]) for n in faster) + " |")
    lines.append("| gap, ReDiff - baseline (points) | " + " | ".join(
        mean_spread([kept_at(rediff, s, n) - kept_at(baseline, s, n) for s in seeds])
        for n in faster) + " |")
    lines += ["", "Paper (CapMAS CLAIR, 1 -> 8 tok/step): baseline 74.53 -> 46.38 (keeps 62 %), "
              "ReDiff 76.74 -> 67.44 (keeps 88 %): a gap of 26 points at 8."]
    lines += ["", f"Seed {s0}, all metrics:", ""]
    lines += table([("baseline (frozen)", baseline[s0]), ("ReDiff (refining)", rediff[s0])], tps,
                   METRICS)
    alone = {s: pick(ev(f"stage2-alone-s{s}", "refine"), True) for s in seeds}
    control = {s: pick(ev(f"stage1-more-s{s}", "refine"), True) for s in seeds}
    base = pick(ev("base", "frozen"), False)
    lines += ["", f"## F3 (paper Table 4): the stages, headline, mean ± half-range over seeds "
              f"{seeds}", "",
              "| model | sampler | " + speeds + " |",
              "|---|---|" + "---|" * len(tps),
              "| base (word-class loss, shared by the seeds) | frozen | "
              + " | ".join(f"{base[n]['headline']:.1f}" for n in tps) + " |"]
    for label, runs in (("Stage I", stage1), ("Stage II alone (from the base)", alone),
                        ("Stage I + II (ReDiff)", rediff),
                        (f"Stage I + {cfg.stage2_steps} more Stage I steps (equal-steps control)",
                         control)):
        lines.append(f"| {label} | refining | " + " | ".join(
            mean_spread([runs[s][n]["headline"] for s in seeds]) for n in tps) + " |")
    for label, other in (("ReDiff - Stage I", stage1), ("ReDiff - control", control)):
        lines.append(f"| margin, {label} (points, seed by seed) | | " + " | ".join(
            mean_spread([rediff[s][n]["headline"] - other[s][n]["headline"] for s in seeds])
            for n in tps) + " |")
    lines += ["", "Paper: both stages help; Stage II alone more than Stage I alone; both together "
              "best."]
    r0 = pick(ev(f"rediff-s{s0}", "both"), True), pick(ev(f"rediff-s{s0}", "both"), False)
    s1 = pick(ev(f"stage1-s{s0}", "both"), True), pick(ev(f"stage1-s{s0}", "both"), False)
    lines += ["", "## F4 (paper Figure 5): refinement at inference on and off", ""]
    lines += table([("ReDiff, refining", r0[0]), ("ReDiff, frozen", r0[1]),
                    ("Stage I, refining", s1[0]), ("Stage I, frozen", s1[1]),
                    ("baseline, refining", pick(ev(f"baseline-s{s0}", "both"), True)),
                    ("baseline, frozen", baseline[s0])], tps)
    lines += ["", "Paper: without refinement at inference ReDiff loses most of its gain under "
              "parallel decoding."]
    lines += ["", "## F5 (paper Table 6): Stage II round 1 vs round 2, refining sampler", ""]
    lines += table([("round 1", rediff[s0]), ("round 2", ends("rediff-round2"))], tps, METRICS)
    lines += ["", "Paper: round 1 gives most of the gain; round 2 adds little."]
    lines += ["", "## F6 (paper Table 5): Stage I variants, refining sampler", ""]
    lines += table([("fixed rate 0.1, syntax + hallucination", s1[0]),
                    ("t-dependent rate", ends("stage1-t-dependent")),
                    ("syntax errors only", ends("stage1-syntax-only")),
                    ("hallucinations only", ends("stage1-hallucination-only"))], tps, METRICS)
    lines += ["", "Paper: syntax repair mostly helps overall quality and coverage, hallucination "
              "repair factuality; both together best; the fixed rate beats the t-dependent one."]
    total = sum(float(open(p + ".done").read()) for p in ckpts.values())
    minutes = (time.perf_counter() - start) / 60
    lines[lines.index("WALL")] = (f"Training: {total / 60:.1f} min (the sum over the models' "
                                  f"runs); this invocation, evaluations included: "
                                  f"{minutes:.1f} min.")
    return "\n".join(lines) + "\n"


def results_page(text: str, argv: list[str]) -> str:
    """The results page: one line naming the command that generated it, then the report `text`."""
    command = " ".join(["python tools/reproduce.py", *map(shlex.quote, argv)])
    return (f"Generated by `{command}` (its REPORT.md); rerun it to update this page, "
            f"never edit it by hand.\n\n{text}")


def write_report(cfg: ReproConfig, text: str, argv: list[str]) -> list[str]:
    """<out>/REPORT.md and, unless --results-page is empty, the results page; the paths written."""
    paths = [os.path.join(cfg.out, "REPORT.md")]
    with open(paths[0], "w") as f:
        f.write(text)
    if cfg.results_page:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.results_page)), exist_ok=True)
        with open(cfg.results_page, "w") as f:
            f.write(results_page(text, argv))
        paths.append(cfg.results_page)
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(ReproConfig, argv, description=__doc__.split("\n\n")[0], presets=PRESETS)
    check_folder_out(cfg.out, "the run (checkpoints, logs, evaluations, report)")
    check_writable(cfg.results_page, "--results-page")
    print(show_config(cfg))
    for sub in ("logs", "eval"):
        os.makedirs(os.path.join(cfg.out, sub), exist_ok=True)
    start = time.perf_counter()
    ckpts = train_all(cfg)
    text = report(cfg, ckpts, start)
    written = write_report(cfg, text, argv)
    from tools.eval import plot_png  # torch stays out of --help
    f1 = [r for role in (f"baseline-s{cfg.seeds[0]}", f"rediff-s{cfg.seeds[0]}")
          for r in evaluate(cfg, ckpts[role], "both")]
    # headline vs tokens per step, baseline and ReDiff, both samplers
    plot_png(f1, os.path.join(cfg.out, "f1.png"))
    print(text)
    print(f"report: {', '.join(written)} ({(time.perf_counter() - start) / 60:.1f} min this "
          f"invocation)")


if __name__ == "__main__":
    run_main(main)
