"""Tests of reproduce.py's bookkeeping: resumable runs, clear failures and the report's arithmetic."""
import os
import re

import pytest

import reproduce

FAKE_TRAIN = """
import sys
args = sys.argv[1:]
out = args[args.index("--out") + 1]
with open(out + ".calls", "a") as f:
    f.write(" ".join(args) + "\\n")
if "--fail" in args:
    print("something went wrong in the fake trainer")
    sys.exit(3)
open(out, "w").write("weights")
"""


def fake_script(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    cfg = reproduce.ReproConfig(out=str(tmp_path), device="cpu")
    os.makedirs(tmp_path / "logs", exist_ok=True)
    return str(path), cfg


def calls(ckpt):
    with open(ckpt + ".calls") as f:
        return [line.split() for line in f]


def test_run_marks_done_and_skips_finished_models(tmp_path):
    script, cfg = fake_script(tmp_path)
    ckpt = str(tmp_path / "m.safetensors")
    assert reproduce.run(cfg, "m", [script, "--out", ckpt], ckpt) == ckpt
    assert os.path.exists(ckpt + ".done")
    reproduce.run(cfg, "m", [script, "--out", ckpt], ckpt)
    assert len(calls(ckpt)) == 1  # the second call found the done marker and ran nothing
    assert calls(ckpt)[0][-2:] == ["--device", "cpu"]


def test_interrupted_model_continues_with_resume(tmp_path):
    script, cfg = fake_script(tmp_path)
    ckpt = str(tmp_path / "m.safetensors")
    open(ckpt, "w").write("half-trained")  # a checkpoint without the done marker: the run was interrupted
    reproduce.run(cfg, "m", [script, "--out", ckpt], ckpt)
    assert "--resume" in calls(ckpt)[0]


def test_failed_model_stops_with_its_log_and_is_not_marked_done(tmp_path):
    script, cfg = fake_script(tmp_path)
    ckpt = str(tmp_path / "m.safetensors")
    with pytest.raises(SystemExit, match="something went wrong in the fake trainer"):
        reproduce.run(cfg, "m", [script, "--out", ckpt, "--fail"], ckpt)
    assert not os.path.exists(ckpt + ".done")


def test_keep_ratio_and_spread():
    by_tps = {1: {"headline": 80.0, "syntax": 1.0}, 8: {"headline": 60.0, "syntax": 0.25}}
    assert reproduce.keep_ratio(by_tps, [1, 8]) == pytest.approx(0.75)
    assert reproduce.keep_ratio(by_tps, [1, 8], "syntax") == pytest.approx(0.25)
    assert reproduce.keep_ratio({1: {"headline": 0.0}, 8: {"headline": 5.0}}, [1, 8]) == 0.0
    assert reproduce.mean_spread([70.0, 74.0, 72.0]) == "72.0 ± 2.0"
    assert reproduce.mean_spread([5.0]) == "5.0"


def test_table_rows_follow_models_and_metrics():
    by_tps = {n: {"headline": 10.0 * n, "syntax": 0.5} for n in (1, 8)}
    lines = reproduce.table([("A", by_tps)], [1, 8])
    assert lines[2] == "| A | headline | 10.0 | 80.0 |"
    assert lines[3] == "| A | syntax | 0.500 | 0.500 |"


def test_quick_preset_is_smaller(tmp_path):
    from cli import parse_config
    quick = parse_config(reproduce.ReproConfig, ["--quick"], presets=reproduce.PRESETS)
    full = reproduce.ReproConfig()
    assert quick.base_steps < full.base_steps and quick.steps < full.steps and quick.n < full.n


def test_table_marks_speeds_a_row_was_not_evaluated_at():
    ends = {n: {"headline": 10.0 * n, "syntax": 0.5} for n in (1, 8)}  # an ablation row: slowest and fastest only
    lines = reproduce.table([("B", ends)], [1, 2, 8])
    assert lines[2] == "| B | headline | 10.0 | – | 80.0 |"


def test_report_tables_from_evaluations(tmp_path, monkeypatch):
    """report() on made-up evaluation rows: the F1 means and keep ratios over seeds, the caption-steps table, and a
    row cached by an older eval.py (no caption_steps) shown as nan instead of failing."""
    cfg = reproduce.ReproConfig(out=str(tmp_path), seeds=[0, 1], tokens_per_step=[1, 8])
    roles = ["base", "rediff-round2", "stage1-t-dependent", "stage1-syntax-only", "stage1-hallucination-only"] + [
        f"{m}-s{s}" for m in ("baseline", "stage1", "rediff", "stage2-alone", "stage1-more") for s in (0, 1)]
    ckpts = {role: str(tmp_path / f"{role}.safetensors") for role in roles}
    for path in ckpts.values():
        open(path + ".done", "w").write("60.0\n")
    headline = {"baseline": {1: 80.0, 8: 20.0}, "rediff": {1: 70.0, 8: 35.0}, "stage1": {1: 75.0, 8: 45.0}}

    def fake_evaluate(cfg, ckpt, sampler, ends_only=False):
        role = os.path.basename(ckpt).split(".")[0]
        seeded = re.fullmatch(r"(.+)-s(\d)", role)                      # e.g. "stage1-s1"; "base": seed 0
        model, seed = seeded.groups() if seeded else (role, "0")
        rows = []
        for n in cfg.tokens_per_step:
            for refine in {"both": (True, False), "frozen": (False,)}.get(sampler, (True,)):
                row = {"tokens_per_step": n, "refine": refine, "factuality": 0.9, "coverage": 0.8, "syntax": 1.0,
                       "repetition": 0.0, "headline": headline.get(model, {1: 50.0, 8: 25.0})[n] + int(seed)}
                if model != "stage1":  # Stage I's rows come from an older eval.py's cache
                    row["caption_steps"] = {1: 20.0, 8: 4.0}[n] + int(seed)
                rows.append(row)
        return rows

    monkeypatch.setattr(reproduce, "evaluate", fake_evaluate)
    text = reproduce.report(cfg, ckpts, start=0.0)
    assert "| mask-trained baseline (Eq. 1) | 80.5 ± 0.5 | 20.5 ± 0.5 | 25.5 ± 0.5 % |" in text  # seed 1: +1
    assert "| ReDiff | 70.5 ± 0.5 | 35.5 ± 0.5 | 50.4 ± 0.4 % |" in text
    assert "| gap, ReDiff - baseline (points) | 24.9 ± 0.1 |" in text  # 50.0 - 25.0 and 50.7 - 25.9
    assert "| mask-trained baseline (Eq. 1) | 20.5 | 4.5 |" in text and "| Stage I alone | nan | nan |" in text
    assert "| margin, ReDiff - Stage I (points, seed by seed) | | -5.0 ± 0.0 | -10.0 ± 0.0 |" in text
    assert "| margin, ReDiff - control (points, seed by seed) | | 20.0 ± 0.0 | 10.0 ± 0.0 |" in text
    assert "Training: 15.0 min" in text  # fifteen models of 60 s each
