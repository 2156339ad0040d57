"""tools/gpu_check.py: a prepared check of a LLaDA-V / ReDiff folder on one device: load, the prompt
ids beside the template text, one forward pass with its peak memory, captions at 1 / 4 / 8 tokens
per step with timings, and Stage I fine-tuning steps (train_stage1.py --init-from FOLDER
--no-save) with the peak memory beside the printed memory plan.

    python tools/gpu_check.py --ckpt LLaDA-V --image photo.jpg             # everything
    python tools/gpu_check.py --ckpt LLaDA-V --image photo.jpg --steps 0   # inference only
    python tools/gpu_check.py --ckpt LLaDA-V --plan-only --device-memory-gib 80   # the plan alone

The fine-tuning trains on --records copies of the photo with the model's own caption, with flags
that fit one 80 GB GPU by default. It runs on the CPU too (the tests do).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)

import distributed  # noqa: E402
import llada_v_train  # noqa: E402
import memory_plan as mp  # noqa: E402
import train_stage1  # noqa: E402
from cli import option, parse_config, run_main  # noqa: E402
from data.loaders import open_image  # noqa: E402
from llada_v import (CAPTION_QUESTION, IMAGE_TOKEN_INDEX, MASK_ID, caption,  # noqa: E402
                     chat_prompt, check_hf_folder, load_llada_v, prompt_ids)
from model import pick_device  # noqa: E402

SPEEDS = (1, 4, 8)  # tokens per step of the paper's tables


@dataclass
class GpuCheckConfig:
    ckpt: str = option("", "required: a Hugging Face LLaDA-V / ReDiff folder")
    image: str = option("", "required: a photo to caption and to fine-tune on")
    device: str = option("auto", "auto (cuda, mps, cpu), cpu, cuda or mps")
    gen_length: int = option(128, "caption length in tokens (the paper: 128)", at_least=8)
    steps: int = option(20, "Stage I fine-tuning steps (0: skip fine-tuning)", at_least=0)
    records: int = option(8, "records to fine-tune on (copies of the photo)", at_least=1)
    batch_size: int = option(4, "fine-tuning samples per step", at_least=1)
    grad_accum: int = option(4, "fine-tuning micro-batches per step", at_least=1)
    optimizer: str = option("adamw8bit", "train_stage1.py --optimizer",
                            choices=["adamw", "adamw8bit"])
    master_dtype: str = option("bfloat16", "train_stage1.py --master-dtype",
                               choices=["float32", "bfloat16"])
    plan_only: bool = option(False, "print the fine-tuning memory plan on one CUDA device from "
                             "--ckpt's config.json (no weights, no image) and stop")
    device_memory_gib: float = option(0.0, "the device's memory in GiB for the plan (0: this "
                                      "machine's device)", at_least=0)
    plan_image: str = option("640x480", "WIDTHxHEIGHT of the image a planned sample holds")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> str:
    """The peak memory of this process: allocated by torch on CUDA, the resident set elsewhere."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / mp.GIB:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return f"{rss / mp.GIB:.2f} GiB"


def prompt_lines(tokenizer, ids: list[int]) -> list[str]:
    """The prompt ids beside the text each one stands for; a run of image placeholders is one
    line."""
    lines, k = [], 0
    while k < len(ids):
        n = 1
        if ids[k] == IMAGE_TOKEN_INDEX:
            n = next((j for j in range(k, len(ids)) if ids[j] != IMAGE_TOKEN_INDEX), len(ids)) - k
            text = f"{IMAGE_TOKEN_INDEX:>7} x {n}  <image> (one placeholder per image token)"
        else:
            text = f"{ids[k]:>7}      {tokenizer.decode([ids[k]], skip_special=False)!r}"
        lines.append(f"  {k:5d}  {text}")
        k += n
    return lines


def check_inference(cfg: GpuCheckConfig, device: torch.device) -> str:
    """Load, show the prompt, one forward pass, captions at each speed -> the 1-token-per-step
    caption."""
    start = time.perf_counter()
    reset_peak(device)
    model, tokenizer = load_llada_v(cfg.ckpt, device)
    print(f"loaded {cfg.ckpt} on {device} ({next(model.parameters()).dtype}) in "
          f"{time.perf_counter() - start:.1f} s; peak {peak(device)}")
    if model.cfg.vision is None:
        raise SystemExit(f"--ckpt {cfg.ckpt} is a text-only LLaDA checkpoint: captioning needs "
                         f"LLaDA-V")
    image = open_image(cfg.image)
    n_image = model.n_image_tokens(image.size)
    prompt = prompt_ids(tokenizer, n_image, CAPTION_QUESTION)
    print(f"template text:\n{chat_prompt(CAPTION_QUESTION)!r}")
    print(f"prompt ids ({len(prompt)}: {n_image} image tokens for {image.width}x{image.height}):")
    print("\n".join(prompt_lines(tokenizer, prompt)))
    reset_peak(device)
    ids = torch.tensor([prompt + [MASK_ID] * cfg.gen_length], device=device)       # (1, P + G)
    with torch.no_grad():
        start = time.perf_counter()
        embeds = model.encode_image(image)                                          # (1, N, D)
        logits = model(ids, embeds, logits_from=len(prompt))                        # (1, G, V)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    print(f"forward pass: {ids.shape[1]} tokens -> logits {tuple(logits.shape)} in "
          f"{time.perf_counter() - start:.3f} s; peak {peak(device)}")
    del logits, embeds
    texts = []
    for speed in SPEEDS:
        reset_peak(device)
        out = caption(cfg.ckpt, cfg.image, speed, gen_length=cfg.gen_length, device=device,
                      loaded=(model, tokenizer))
        texts.append(out["text"])
        print(f"caption at {speed} token(s)/step: {out['forward_passes']} forward passes, "
              f"{out['seconds']:.2f} s, peak {peak(device)}\n  {out['text']!r}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return texts[0]


def finetune_argv(cfg: GpuCheckConfig, device_type: str, data_json: str, out: str) -> list[str]:
    """train_stage1.py's flags for the fine-tuning check (nothing written)."""
    memory = ["--device-memory-gib", str(cfg.device_memory_gib)] if cfg.device_memory_gib else []
    return ["--init-from", cfg.ckpt, "--data-json", data_json, "--image-root", "/",
            "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
            "--grad-accum", str(cfg.grad_accum), "--optimizer", cfg.optimizer,
            "--master-dtype", cfg.master_dtype, "--activation-checkpointing",
            "--answer-len", str(cfg.gen_length), "--device", device_type, "--no-save",
            "--out", out, "--plan-image", cfg.plan_image, *memory]


def check_finetuning(cfg: GpuCheckConfig, device: torch.device, text: str) -> None:
    """--steps of Stage I on --records copies of the photo, nothing written; the peak beside the
    plan."""
    folder = tempfile.mkdtemp(prefix="gpu_check_")
    records = [{"id": str(k), "image": os.path.abspath(cfg.image), "conversations": [
        {"from": "human", "value": "<image>\n" + CAPTION_QUESTION},
        {"from": "gpt", "value": text or "a photo."}]} for k in range(cfg.records)]
    data_json = os.path.join(folder, "records.json")
    with open(data_json, "w") as f:
        json.dump(records, f)
    argv = finetune_argv(cfg, device.type, data_json, os.path.join(folder, "out"))
    print("fine-tuning: python train_stage1.py " + " ".join(argv))
    reset_peak(device)
    start = time.perf_counter()
    train_stage1.main(argv)  # prints the memory plan, then trains
    seconds = time.perf_counter() - start
    print(f"fine-tuning: {cfg.steps} steps in {seconds:.1f} s ({seconds / max(1, cfg.steps):.2f} "
          f"s a step, loading included); peak {peak(device)} "
          f"({'allocated by torch' if device.type == 'cuda' else 'resident set of the process'})")


def print_plan(cfg: GpuCheckConfig, device: torch.device) -> mp.MemoryPlan:
    """--plan-only: the fine-tuning check's memory plan on one CUDA device, as train_stage1.py
    prints it there, and its refusal: computed anywhere (--device-memory-gib 80 on a laptop)."""
    if not os.path.isfile(os.path.join(cfg.ckpt, "config.json")):
        raise SystemExit(f"--ckpt {cfg.ckpt}: no config.json; give a LLaDA-V / ReDiff folder")
    argv = finetune_argv(cfg, "cuda", "DATA.json", "OUT")
    flags = parse_config(train_stage1.TrainConfig, argv)
    llada_v_train.choose(flags, argv, llada_v_train.STAGE1_DEFAULTS)  # the real model's flags
    print("python train_stage1.py " + " ".join(argv))
    return mp.check_memory(flags, distributed.Context(device=device), "cuda", refuse=False)


def main(argv=None):
    cfg = parse_config(GpuCheckConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.plan_only:
        return print_plan(cfg, pick_device(cfg.device))
    if not cfg.ckpt or not cfg.image:
        raise SystemExit("--ckpt and --image are required (python tools/gpu_check.py --help)")
    check_hf_folder(cfg.ckpt, "--ckpt")
    if not os.path.isfile(cfg.image):
        raise SystemExit(f"--image {cfg.image}: file not found; give a photo (JPEG or PNG)")
    device = pick_device(cfg.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device: {props.name}, {props.total_memory / mp.GIB:.1f} GiB")
    text = check_inference(cfg, device)
    if cfg.steps:
        check_finetuning(cfg, device, text)


if __name__ == "__main__":
    run_main(main)
