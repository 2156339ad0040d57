"""tests/test_bench.py: tools/bench.py's verdicts, one line per performance target, are computed
from the rows (met / not met at each boundary), and the sampler target's pieces give the answers
they must: the floored threshold is the fixed schedule when nothing passes the threshold, the exact
prefix cache changes no id, the headline check pairs the same scenes. Nothing here is timed."""
import sys

import pytest
import torch

from data import shapes
from data.tokenizer import WordTokenizer
from sample import caption_images
from tools import bench


def rows(recipe=None, flops=60.0, speedup=5.0, exact=3.9, ids_equal=True, diff=None, se=0.0):
    """Hand-made rows of a bench run: a training step at `flops` GFLOP/s against a 100 GFLOP/s
    matmul, the exact prefix cache `exact` x the plain loop (its ids equal to the loop's or not),
    all combined `speedup` x, and optionally a recipe row and a headline check (paired difference
    diff, standard error se)."""
    target = {"tokens_per_step": 8, "model": "long prefix-dlm (256 img)"}
    out = [{"section": "training step", "flops_per_s": flops * 1e9, "seconds": 0.07},
           {"section": "matmul ceiling", "flops_per_s": 100e9, "dtype": "float32",
            "native_bf16": False},
           {"section": "target: plain loop", "speedup": 1.0, "identical_tokens": 1.0, **target},
           {"section": "target: + exact prefix cache", "speedup": exact,
            "identical_tokens": 1.0 if ids_equal else 0.99, **target},
           {"section": "target: all combined", "speedup": speedup, "identical_tokens": 1.0,
            **target}]
    if recipe is not None:
        out.append(recipe)
    if diff is not None:
        out.append({"section": "headline check: all combined", "headline_diff": diff,
                    "headline_se": se, "scenes": 1000, "mean_passes": 6.0,
                    "caption_steps": 5.2})
    return out


def verdicts(lines):
    assert [line.split(",")[0] for line in lines] == [f"target {k}" for k in (1, 2, 3, 4)]
    return [line.rsplit("-> ", 1)[1] if "-> " in line else None for line in lines]


def test_one_line_per_target_met_exactly_at_each_boundary():
    measured = {"section": "recipe", "seconds": 300.0, "load_before": 0.1}
    lines = bench.targets(rows(measured, flops=60.0, speedup=5.0, diff=-1.0), bench_seconds=90)
    assert verdicts(lines) == ["met"] * 4
    assert "5.0 min measured" in lines[0] and "60.0% of 100.0 GFLOP/s (float32" in lines[1]
    assert "no native bf16" in lines[1] and "5.00x" in lines[2] and "90 s" in lines[3]
    assert "over 1000 scenes, 5.20 steps a caption" in lines[2]


def test_each_target_fails_just_past_its_boundary():
    measured = {"section": "recipe", "seconds": 301.0, "load_before": 0.1}
    lines = bench.targets(rows(measured, flops=59.9, speedup=4.99, diff=0.0), bench_seconds=91)
    assert verdicts(lines) == ["not met"] * 4


@pytest.mark.parametrize("diff, se, met", [(-0.5, 0.25, True), (-0.5, 0.26, False),
                                           (2.0, 0.5, True), (-1.01, 0.0, False)])
def test_headline_verdict_reads_the_lower_end_of_the_95_interval(diff, se, met):
    """At most one point lost: the interval's lower end must not fall below -1 (scoring higher
    than the plain loop is no failure)."""
    line = bench.targets(rows(speedup=6.0, diff=diff, se=se), 60)[2]
    assert line.endswith("-> met" if met else "-> not met")
    assert f"{diff - bench.Z95 * se:+.2f} to {diff + bench.Z95 * se:+.2f}" in line


def test_an_exact_combination_needs_no_headline_check_but_its_ids_must_match():
    assert bench.targets(rows(speedup=4.0, exact=5.0), 60)[2].endswith(
        "fastest exact + exact prefix cache 5.00x (the plain loop's ids), all combined 4.00x "
        "with its headline unchecked (--ckpt a Prefix-DLM base) -> met")
    assert bench.targets(rows(speedup=4.0, exact=4.99), 60)[2].endswith("-> not met")
    differ = bench.targets(rows(speedup=4.0, exact=6.0, ids_equal=False), 60)[2]
    assert "fastest exact + exact" not in differ and differ.endswith("-> not met")
    assert bench.targets(rows(speedup=7.0), 60)[2].endswith("unchecked (--ckpt a Prefix-DLM "
                                                             "base) -> not met")


def test_unmeasured_targets_say_so_and_get_no_verdict():
    lines = bench.targets(rows(), 60)
    assert lines[0].endswith("not timed in this run (--time-recipe)") and "-> " not in lines[0]
    bare = bench.targets([], 60)
    assert "not timed" in bare[0] and "not measured" in bare[1] and "not measured" in bare[2]


@pytest.fixture
def tiny_prefix_dlm():
    tokenizer = WordTokenizer.for_shapes_world()
    return bench.build(tokenizer, 48, prefix_dlm=True), tokenizer


def test_floored_threshold_is_the_schedule_when_nothing_passes_and_one_pass_when_all_do(
        one_thread, tiny_prefix_dlm):
    model, tokenizer = tiny_prefix_dlm
    images = bench.inputs(model, 3)
    schedule, passes = caption_images(model, tokenizer, images, 16, 4, refine=False)
    for cache in (False, True):  # Prefix-DLM: the cache is exact
        floored, floored_passes = bench.floored_threshold(model, tokenizer, images, 16, 4, 1.0,
                                                          prefix_cache=cache)
        assert torch.equal(floored, schedule) and floored_passes == passes == 4
    row_steps = []
    everything, one_pass = bench.floored_threshold(model, tokenizer, images, 16, 4, 1e-9,
                                                   row_steps=row_steps)
    assert one_pass == 1 and (everything != tokenizer.mask_id).all()
    assert row_steps[0].tolist() == [1, 1, 1]


def test_headline_check_pairs_the_same_scenes(one_thread, tiny_prefix_dlm):
    model, tokenizer = tiny_prefix_dlm
    cfg = bench.BenchConfig(tokens_per_step=[8], gen_length=16, threshold=[1.0],
                            headline_scenes=5, ckpt="runs/base.safetensors")
    world = shapes.WorldConfig(image_size=48, max_words=47)
    plain, combined = bench.headline_check(model, tokenizer, world, cfg)
    assert combined["headline_diff"] == 0 and combined["headline_se"] == 0
    assert combined["scenes"] == 5 and combined["mean_passes"] == combined["caption_steps"] == 2
    assert plain["score"] == combined["score"] and combined["ids"].startswith("100.0%")


def test_training_step_in_bfloat16_and_the_recipe_timer(one_thread):
    tokenizer = WordTokenizer.for_shapes_world()
    cfg = bench.BenchConfig(train_batch=2, train_steps=1, matmul_size=64)
    step, ceiling = bench.bench_training(tokenizer, cfg, torch.bfloat16)
    assert step["model"] == "tiny, bfloat16" and ceiling["dtype"] == "bfloat16"
    assert step["flops_per_s"] > 0 and isinstance(ceiling["native_bf16"], bool)
    row = bench.time_recipe(0.25, lambda folder: [sys.executable, "-c", "print('trained')"])
    assert row["section"] == "recipe" and row["seconds"] > 0 and row["load_before"] == 0.25
    with pytest.raises(SystemExit, match="failed with exit status 3"):
        bench.time_recipe(0.25, lambda folder: [sys.executable, "-c", "import sys; sys.exit(3)"])


def test_quick_run_ends_with_the_four_verdicts(one_thread, capsys):
    bench.main(["--quick", "--batch-sizes", "1", "--tokens-per-step", "1", "4", "--gen-length",
                "8", "--train-batch", "2", "--train-steps", "1", "--long-patches", "2"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in out[-4:]] == [f"target {k}" for k in (1, 2, 3, 4)]
    assert "| target: all combined |" in "\n".join(out)
