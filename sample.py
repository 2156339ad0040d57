"""sample.py: caption a held-out scene with the refining and the frozen sampler, and score both.

    python train_stage1.py --tiny          # the base model, then Stage I: out/stage1.safetensors
    python sample.py --tokens-per-step 8   # a held-out scene: ground truth, refinement trace,
                                           # caption and score with each sampler, mean scores

The sampler the checkpoint was trained for runs first (refining, unless it is mask-trained), then
the other one for comparison. --image captions an image file instead; --ckpt DIR with --image
captions a photo with a Hugging Face LLaDA-V / ReDiff folder.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from html import escape

import torch

import rediff
from checkpoints import load_for
from cli import DCP_META, UsageError, check_writable, option, parse_config, run_main
from data import shapes
from data.loaders import open_image
from data.pipeline import held_out_indices, image_to_tensor, prompt_ids
from data.score import score_caption, score_captions
from data.tokenizer import split_words, tokenizer_from_dict
from llada_v import caption, check_hf_folder, load_llada_v
from model import ModelLogits, pick_device


def check_block_length(block_length: int, gen_length: int, what: str) -> None:
    """--block-length must cut the answer into whole blocks (rediff.generate's semi-autoregressive
    blocks)."""
    if block_length and (block_length > gen_length or gen_length % block_length):
        divisors = ", ".join(str(n) for n in range(1, gen_length + 1) if gen_length % n == 0)
        raise UsageError(f"--block-length {block_length} must divide {what} length "
                         f"{gen_length}; choose one of {divisors} (or 0: one block)")


def schedule_text(gen_length: int, tokens_per_step: int, block_length: int = 0) -> str:
    """What the fixed schedule does, in words: "6 steps of 8 tokens", "22 steps of up to 3 tokens",
    "1 step of 48 tokens (--tokens-per-step 100 is more than the 48-token answer)"."""
    block = block_length or gen_length
    num_blocks = gen_length // block
    steps = rediff.steps_for(gen_length, tokens_per_step, num_blocks)
    per_block = steps // num_blocks
    most = math.ceil(block / per_block)  # rediff.transfer_schedule's largest share of a block
    up_to = "" if block % per_block == 0 else "up to "
    text = f"{steps} step{'s' if steps > 1 else ''} of {up_to}{most} token{'s' if most > 1 else ''}"
    if most < tokens_per_step:
        held = f"the {block}-token block" if num_blocks > 1 else f"the {gen_length}-token answer"
        text += f" (--tokens-per-step {tokens_per_step} is more than {held})"
    return text


def draft_ids(tokenizer, text: str, gen_length: int) -> list[int]:
    """--draft -> the answer's gen_length ids: its words, then masks. Words the vocabulary lacks
    (they become <unk>) and tokens cut off at gen_length are named in a warning on stderr, never
    dropped silently."""
    words = dict.fromkeys(split_words(text))
    unknown = ", ".join(repr(w) for w in words if tokenizer.unk_id in tokenizer.encode(w))
    if unknown:
        print(f"warning: --draft: the checkpoint's vocabulary has no {unknown}: each enters the "
              f"draft as <unk>, which the caption shows as nothing unless the refining sampler "
              f"rewrites it", file=sys.stderr)
    ids = tokenizer.encode(text)
    if len(ids) > gen_length:
        print(f"warning: --draft has {len(ids)} tokens, more than the {gen_length}-token answer: "
              f"its last {len(ids) - gen_length} are dropped", file=sys.stderr)
    return ids[:gen_length] + [tokenizer.mask_id] * (gen_length - len(ids))


def banned_ids(tokenizer) -> list[int]:
    """Ids that must never appear in a caption (everything special except end of text)."""
    return [i for i in tokenizer.special_ids if i != tokenizer.eos_id]


@torch.no_grad()
def caption_images(model, tokenizer, images, gen_length: int, tokens_per_step: int,
                   refine: bool = True, block_length: int | None = None, temperature: float = 0.0,
                   drafts=None, return_trace: bool = False, generator=None,
                   prefix_cache: bool = False, threshold: float | None = None,
                   threshold_floor: bool = False):
    """Images (B, 3, S, S) -> (answer ids (B, G) [and the trace], forward passes) by
    rediff.generate. Image tokens are computed once, not per step. prefix_cache: see ModelLogits;
    threshold: rediff.generate's confidence threshold (then tokens_per_step only sets the unused
    `steps`, or with threshold_floor each step's least)."""
    device = next(model.parameters()).device
    image_embeds = model.encode_images(images.to(device))                          # (B, N, D)
    prompt = torch.tensor(prompt_ids(tokenizer, model.n_image_tokens), device=device)
    prompt = prompt.expand(images.shape[0], -1)                                     # (B, P)
    logits_fn = ModelLogits(model, image_embeds, prompt.shape[1], prefix_cache)
    num_blocks = gen_length // (block_length or gen_length)
    steps = rediff.steps_for(gen_length, tokens_per_step, num_blocks)
    out = rediff.generate(logits_fn, prompt, gen_length, steps, block_length=block_length,
                          temperature=temperature, refine=refine, mask_id=tokenizer.mask_id,
                          stop_id=tokenizer.eos_id, banned_ids=banned_ids(tokenizer), draft=drafts,
                          return_trace=return_trace, generator=generator, threshold=threshold,
                          on_block=logits_fn.begin_block, threshold_floor=threshold_floor)
    return out, logits_fn.forward_passes


def decode_answer(tokenizer, ids) -> str:
    """Answer ids -> text, cut at the first end-of-text."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids)


# --------------------------------------------------------------------------------------------------
# Showing the refinement (the paper's Figure 4)

NEW, REVISED, RESET = "\033[32m", "\033[33;1m", "\033[0m"


def trace_lines(tokenizer, trace, row: int = 0, color: bool = True) -> list[str]:
    """One line per step of rediff.generate's trace: newly committed tokens in green, revised
    tokens in bold yellow, masks as '_' (the paper's Figure 4); without colour (output to a file)
    new tokens are +word and revised ones [word]."""
    lines = []
    for entry in trace:
        words = []
        for pos, token in enumerate(entry["ids"][row].tolist()):
            word = ("_" if token == tokenizer.mask_id
                    else tokenizer.decode([token], skip_special=False))
            if entry["changed"][row, pos]:
                word = f"{REVISED}{word}{RESET}" if color else f"[{word}]"
            elif entry["new"][row, pos]:
                word = f"{NEW}{word}{RESET}" if color else f"+{word}"
            words.append(word)
        lines.append(f"step {entry['step']:3d} | " + " ".join(words))
    return lines


def trace_html(tokenizer, trace, row: int = 0) -> str:
    """The trace as a self-contained HTML page: new tokens green, revised tokens orange with the old
    token struck."""
    rows, previous = [], None
    for entry in trace:
        cells = []
        for pos, token in enumerate(entry["ids"][row].tolist()):
            word = escape("·" if token == tokenizer.mask_id
                          else tokenizer.decode([token], skip_special=False))
            if entry["changed"][row, pos] and previous is not None:
                old = escape(tokenizer.decode([int(previous[pos])], skip_special=False))
                word, kind = f"<s>{old}</s> {word}", "rev"
            else:
                kind = ("new" if entry["new"][row, pos]
                        else "mask" if token == tokenizer.mask_id else "old")
            cells.append(f'<span class="{kind}">{word}</span>')
        previous = entry["ids"][row]
        rows.append(f"<tr><td>step {entry['step']}</td><td>{' '.join(cells)}</td></tr>")
    style = (".new{background:#c8f7c5}.rev{background:#ffd59e}.mask{color:#bbb}"
             "td{font-family:monospace;padding:2px 8px;vertical-align:top}")
    return (f"<!doctype html><meta charset='utf-8'><title>ReDiff refinement trace</title>"
            f"<style>{style}</style>"
            f"<p><span class='new'>new token</span> <span class='rev'><s>old</s> revised</span></p>"
            f"<table>{''.join(rows)}</table>")


# --------------------------------------------------------------------------------------------------
# The demo: one held-out scene with both samplers, then both samplers' mean score

DEMO_CKPT = "out/stage1.safetensors"  # what the demo's training command writes
MASK_TRAINED = "stage1-mask"  # train_stage1.py --objective mask: Eq. 1, never trained to revise
SAMPLERS = {True: "refining", False: "frozen"}  # Section 3.4's sampler, LLaDA's


@dataclass
class SampleConfig:
    ckpt: str = option(DEMO_CKPT, "checkpoint written by train_stage1.py / train_stage2.py, or a "
                       "Hugging Face LLaDA-V / ReDiff folder")
    image: str = option("", "caption this image file instead of a held-out shapes-world scene")
    scene_seed: int = option(0, "the held-out scene the evaluation's pool draws with this seed "
                             "(its ground truth is printed and scored)", at_least=0)
    tokens_per_step: int = option(8, "tokens committed per step; steps = ceil(gen_length / "
                                  "tokens_per_step)", at_least=1)
    gen_length: int = option(0, "answer length in tokens (0: the checkpoint's)", at_least=0)
    block_length: int = option(0, "semi-autoregressive block length, dividing the answer length "
                               "(0: one block, as in the paper)", at_least=0)
    temperature: float = option(0.0, "Gumbel-noise temperature (0: greedy)", at_least=0)
    # "auto" until pick_sampler reads the checkpoint; --refine / --no-refine set True / False
    refine: bool = option("auto", "re-predict visible tokens at every step (Section 3.4) or, "
                          "--no-refine, freeze them; auto: refine unless mask-trained")
    draft: str = option("", "a caption (with errors) to start from as visible tokens")
    trace: bool = option(True, "print the refinement step by step (new green, revised yellow)")
    trace_out: str = option("", "write the trace as an HTML page to this file")
    n_mean: int = option(48, "then both samplers' mean score over this many held-out scenes (0: "
                         "off)", at_least=0)
    device: str = option("auto", "auto, cpu, cuda or mps")
    seed: int = option(0, "random seed (only matters with --temperature > 0)", at_least=0)
    prefix_cache: bool = option(False, "reuse the image + prompt keys/values within a block "
                                "(Fast-dLLM's approximate KV cache)")
    threshold: float = option(0.0, "commit every masked token with confidence >= P, at least one "
                              "a step (Fast-dLLM); 0: --tokens-per-step", at_least=0, at_most=1)


def pick_sampler(refine, meta: dict, ckpt: str) -> tuple[bool, str]:
    """--refine / --no-refine, or by default ("auto") what the checkpoint was trained for: a model
    trained to revise (Stage I revision, Section 3.2; Stage II, Section 3.3) refines (Section 3.4);
    a mask-trained model (Eq. 1 only) decodes frozen, since refinement hurts a model that never
    learned to revise. Returns (refine, why)."""
    if refine != "auto":
        return refine, "--refine" if refine else "--no-refine"
    stage = meta.get("stage")
    if stage == MASK_TRAINED:
        return False, (f"{ckpt} is mask-trained ({stage}), never trained to revise: refinement "
                       f"would hurt it (--refine to try)")
    return True, f"{ckpt} ({stage}) was trained to revise (--no-refine to freeze)"


def score_text(scores: dict) -> str:
    """data/score.py's metrics on one line."""
    return (f"headline {scores['headline']:.1f} | factuality {scores['factuality']:.2f} | "
            f"coverage {scores['coverage']:.2f} | syntax {scores['syntax']:.2f} | "
            f"repetition {scores['repetition']:.2f}")


def sampler_options(cfg: SampleConfig) -> dict:
    """--block-length, --temperature, --prefix-cache and --threshold, as caption_images takes
    them."""
    return dict(block_length=cfg.block_length or None, temperature=cfg.temperature,
                prefix_cache=cfg.prefix_cache, threshold=cfg.threshold or None)


def speed_text(cfg: SampleConfig, gen_length: int) -> str:
    """How fast the sampler was asked to decode, in words."""
    text = (f"threshold {cfg.threshold}" if cfg.threshold
            else schedule_text(gen_length, cfg.tokens_per_step, cfg.block_length))
    if cfg.prefix_cache:
        text += ", prefix cache (refresh once per block)"
    return text


def print_trace_and_caption(cfg: SampleConfig, tokenizer, trace, text: str) -> None:
    """The trace on the terminal (--trace) and as an HTML page (--trace-out), then the caption."""
    if trace and cfg.trace:
        print("\n".join(trace_lines(tokenizer, trace, color=sys.stdout.isatty())))
    if trace and cfg.trace_out:
        with open(cfg.trace_out, "w", encoding="utf-8") as f:
            f.write(trace_html(tokenizer, trace))
        print(f"trace written to {cfg.trace_out}")
    print(f"caption      : {text}")


def caption_and_show(model, tokenizer, images, drafts, scene, gen_length: int, refine: bool,
                     cfg: SampleConfig, show_trace: bool) -> str:
    """Caption one image with one sampler and print the trace (on request), the caption, its
    score (a shapes-world scene) and the decoding's cost."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    want_trace = show_trace and bool(cfg.trace or cfg.trace_out)
    start = time.perf_counter()
    out, passes = caption_images(model, tokenizer, images, gen_length, cfg.tokens_per_step, refine,
                                 drafts=drafts, return_trace=want_trace, generator=generator,
                                 **sampler_options(cfg))
    seconds = time.perf_counter() - start
    ids, trace = out if want_trace else (out, None)
    text = decode_answer(tokenizer, ids[0])
    print_trace_and_caption(cfg, tokenizer, trace, text)
    if scene is not None:
        print(f"score        : {score_text(score_caption(text, scene))}")
    print(f"decoding     : {SAMPLERS[refine]}, {speed_text(cfg, gen_length)}, "
          f"{passes} forward passes, {gen_length / seconds:.0f} tokens/s ({seconds:.2f} s)")
    return text


@torch.no_grad()
def mean_scores(model, tokenizer, world, gen_length: int, refine: bool, cfg: SampleConfig,
                batch_size: int = 64) -> dict:
    """data/score.py's mean metrics of one sampler over the evaluation's held-out scenes
    held_out_indices(cfg.n_mean, 0), at the chosen speed."""
    vision, texts, scenes = model.cfg.vision, [], []
    indices = held_out_indices(cfg.n_mean, 0)
    for lo in range(0, len(indices), batch_size):
        samples = [shapes.sample("test", i, world) for i in indices[lo:lo + batch_size]]
        images = image_to_tensor([s["image"] for s in samples], vision.mean, vision.std)
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
        ids, _ = caption_images(model, tokenizer, images, gen_length, cfg.tokens_per_step, refine,
                                generator=generator, **sampler_options(cfg))
        texts += [decode_answer(tokenizer, row) for row in ids]
        scenes += [s["scene"] for s in samples]
    return score_captions(texts, scenes)


def caption_real_weights(cfg: SampleConfig) -> str:
    """--ckpt is a Hugging Face LLaDA-V / ReDiff folder: load it with llada_v.py and caption
    --image (the refining sampler unless --no-refine) with the official LLaDA-V sampler's rules
    (banned ids, stop at <|eot_id|>)."""
    if not cfg.image:
        raise SystemExit(f"{cfg.ckpt} is a LLaDA-V / ReDiff folder: give the photo to caption "
                         f"with --image PATH")
    if cfg.draft:
        raise SystemExit("--draft works with this project's checkpoints only, not with a "
                         "LLaDA-V / ReDiff folder: drop it")
    refine, gen_length = cfg.refine is not False, cfg.gen_length or 128  # auto: refine, as ReDiff
    check_block_length(cfg.block_length, gen_length, "the answer")
    loaded = load_llada_v(cfg.ckpt, pick_device(cfg.device))
    out = caption(cfg.ckpt, cfg.image, cfg.tokens_per_step, refine, gen_length, device=cfg.device,
                  seed=cfg.seed, return_trace=bool(cfg.trace or cfg.trace_out), loaded=loaded,
                  **sampler_options(cfg))
    print_trace_and_caption(cfg, loaded[1], out["trace"], out["text"])
    print(f"decoding     : {SAMPLERS[refine]}, {speed_text(cfg, gen_length)}, "
          f"{out['forward_passes']} forward passes ({out['seconds']:.2f} s)")
    return out["text"]


def main(argv=None):
    """The demo: caption a held-out scene (or --image) with the sampler the checkpoint was trained
    for, the same input with the other sampler, then both samplers' mean score."""
    cfg = parse_config(SampleConfig, argv, description=__doc__)
    if os.path.isdir(cfg.ckpt) and not os.path.isfile(os.path.join(cfg.ckpt, DCP_META)):
        check_hf_folder(cfg.ckpt, "--ckpt")
        return caption_real_weights(cfg)
    check_writable(cfg.trace_out, "--trace-out")
    device = pick_device(cfg.device)
    model, meta = load_for(cfg.ckpt, "--ckpt", needs=("tokenizer", "world", "answer_len"),
                           device=device)
    model.eval()
    refine, why = pick_sampler(cfg.refine, meta, cfg.ckpt)
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    gen_length = cfg.gen_length or meta["answer_len"]
    what = "--gen-length" if cfg.gen_length else f"{cfg.ckpt}'s answer"
    check_block_length(cfg.block_length, gen_length, what)
    world, vision = shapes.WorldConfig(**meta["world"]), model.cfg.vision
    print(f"sampler      : {SAMPLERS[refine]}: {why}")
    scene = None
    if cfg.image:
        picture = open_image(cfg.image).resize((vision.image_size, vision.image_size))
    else:
        index = held_out_indices(1, cfg.scene_seed)[0]
        sample = shapes.sample("test", index, world)
        picture, scene = sample["image"], sample["scene"]
        print(f"scene        : held-out test scene {index} (--scene-seed {cfg.scene_seed})")
        print(f"ground truth : {sample['caption']}")
    images = image_to_tensor([picture], vision.mean, vision.std)
    drafts = (torch.tensor([draft_ids(tokenizer, cfg.draft, gen_length)], device=device)
              if cfg.draft else None)                                              # (1, G)
    text = caption_and_show(model, tokenizer, images, drafts, scene, gen_length, refine, cfg,
                            show_trace=True)
    print(f"\nfor comparison, the {SAMPLERS[not refine]} sampler on the same input:")
    caption_and_show(model, tokenizer, images, drafts, scene, gen_length, not refine, cfg,
                     show_trace=False)
    if cfg.n_mean:
        print(f"\nmean over {cfg.n_mean} held-out scenes (the evaluation's, seed 0), "
              f"{speed_text(cfg, gen_length)}:")
        means = {r: mean_scores(model, tokenizer, world, gen_length, r, cfg)
                 for r in (refine, not refine)}
        for r, scores in means.items():
            print(f"{SAMPLERS[r]:12s} : {score_text(scores)}")
        gap = means[True]["headline"] - means[False]["headline"]
        print(f"verdict      : refining - frozen = {gap:+.1f} headline points")
    return text


if __name__ == "__main__":
    run_main(main)
