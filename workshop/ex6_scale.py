"""workshop/ex6_scale.py: exercise 6, scale: a real-format checkpoint, and what an 8B caption costs.

Goal
    Everything so far ran on a toy model. The same code loads the real LLaDA-V / ReDiff weights
    (about 17 GB, not downloaded today). Load a tiny checkpoint folder written in exactly the
    real format (the one the project's tests build: the real key names, two safetensors shards
    and their index, config.json, a tokenizer.json with the real special ids) with the project's
    loader, read its config, count its parameters from the config alone, then work out the
    memory and the FLOPs of one 128-token caption by the 8B model.

Paper
    Section 4 (LLaDA-V is the base model; 128-token captions; 1, 2, 4, 8 tokens per step =
    128, 64, 32, 16 steps) and Section 3.4 (the refining sampler needs no extra forward pass).

Where the project implements it (read it afterwards)
    llada_v.py: load_llada_v, config_from_hf, anyres_layout, caption; model.py: LLaDA, LMConfig;
    rediff.py: steps_for; tests/test_llada_v.py: the tiny folder and the 8B parameter count;
    tools/bench.py: training_flops (the same FLOP conventions, for training).

Your task
    Fill in the TODO lines of lm_parameters (3) and forward_flops (2). The language model of the
    real LLaDA-V (its config.json): hidden 4096, 32 layers, 32 attention heads, 32 key/value
    heads (head dim 128), SwiGLU MLP 12288, vocabulary 126349; untied input embedding and output
    head; RMSNorm weights only; no biases. FLOPs: a weight matrix used by one token costs 2 FLOPs
    per entry (a multiply and an add); in every layer, the attention scores Q K^T and the weighted
    sum A V cost 2 L^2 d each (L tokens, d = heads x head dim); norms, softmax and RoPE are left
    out (small); the embedding is a lookup (no FLOP).

Run
    python workshop/check.py 6
    python workshop/ex6_scale.py      # builds and loads the tiny folder, then the 8B arithmetic
    `check.py 6` ends with "exercise 6: all 5 checks passed" once the TODOs are done.

Expected output of `python workshop/ex6_scale.py` once the TODOs are done (measured):
    tiny folder: config.json, model-00001-of-00002.safetensors, model-00002-of-00002.safetensors,
                 model.safetensors.index.json, tokenizer.json
    config.json: hidden_size 32, num_hidden_layers 2, num_attention_heads 4,
                 num_key_value_heads 2, intermediate_size 64, vocab_size 126349
    loaded: LMConfig(vocab_size=126349, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ...)
    language model parameters: loaded 8,104,928, your lm_parameters 8,104,928
    LLaDA-V 8B: language model 8,014,639,104 + vision tower 397,745,440
                + projector 21,504,000 + image_newline 4,096 = 8,433,892,640 parameters
    weights in bf16: 16.87 GB
    a 1024 x 768 photo: 3,627 image tokens; L = 3,627 + 60 prompt + 128 answer = 3,815 tokens
    one forward pass over L: 64.83 TFLOP (weight matrices 57.20, attention 7.63)
    logits of one pass: L x 126,349 x 2 bytes = 0.96 GB in bf16
    1 token/step: 128 forward passes = 8.30 PFLOP = 16.6 s at 500 TFLOP/s
    8 tokens/step: 16 forward passes = 1.04 PFLOP = 2.1 s at 500 TFLOP/s

Questions to discuss
    1. Which term dominates one forward pass, and which one grows fastest with a larger image? At
       what sequence length would attention cost as much as the weight matrices?
    2. The refining sampler re-predicts every visible token at every step. Why does that cost no
       FLOP more than the frozen sampler? What would make it cost more?
    3. 8 tokens per step is 8 times fewer forward passes than 1 token per step. What must the
       model be good at for that speed-up to be worth taking? (Back to exercises 2 and 3.)
"""
import json
import logging
import os
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from llada_v import LLaDAV, anyres_layout, config_from_hf, load_llada_v  # noqa: E402
from model import LMConfig  # noqa: E402
from rediff import steps_for  # noqa: E402
from workshop.todo import TODO, Todo  # noqa: E402

BF16_BYTES = 2             # bytes per number in bfloat16, the checkpoint's dtype
PROMPT_TEXT_TOKENS = 60    # the chat template and the question, about (the README's estimate)
GEN_LENGTH = 128           # the paper's caption length
PHOTO = (1024, 768)        # width, height of the example photo
GPU_FLOPS = 500e12         # a round figure: about half of an H100's dense bf16 peak
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # transformers' import warns


def lm_parameters(cfg: LMConfig) -> int:
    """The number of parameters of model.LLaDA(cfg), from the config alone."""
    head_dim = cfg.d_model // cfg.n_heads
    kv_heads = cfg.n_kv_heads or cfg.n_heads
    attention = TODO("weights of one layer's q, k, v, o projections (k, v: kv_heads x head_dim)")
    mlp = TODO("weights of one layer's SwiGLU MLP: gate and up (d_model -> mlp_hidden), down")
    per_layer = attention + mlp + 2 * cfg.d_model                             # + 2 RMSNorm weights
    return TODO("n_layers layers + the input embedding + the output head + the final norm")


def forward_flops(cfg: LMConfig, seq_len: int) -> int:
    """FLOPs of one forward pass of the language model over seq_len tokens, with the logits of
    every position."""
    # every weight matrix (the layers' and the output head's): all parameters but the embedding
    # table and the norm weights
    matmul_weights = (lm_parameters(cfg) - cfg.vocab_size * cfg.d_model
                      - (2 * cfg.n_layers + 1) * cfg.d_model)
    linear = TODO("2 FLOPs per entry of every weight matrix, for each of the seq_len tokens")
    attention = TODO("Q K^T and A V: 2 seq_len^2 d_model FLOPs each, in every layer")
    return linear + attention


# ------------------------------------------------------------------------------------------------
# The demo (python workshop/ex6_scale.py)


def build_tiny_folder(root: str) -> str:
    """Write the tests' tiny LLaDA-V folder (the `tiny` fixture of tests/test_llada_v.py, its own
    code) under root; returns the folder."""
    from tests import test_llada_v
    folder = pathlib.Path(root) / "llada_v_tiny"
    folder.mkdir()
    return str(test_llada_v.build_tiny(str(folder))[0])


def real_8b_counts() -> dict:
    """The published LLaDA-V config (as the project's tests hold it) and its parameter counts,
    by the project's model built on the meta device (shapes only, no memory)."""
    from tests.test_llada_v import REAL_CONFIG
    cfg = config_from_hf(REAL_CONFIG)
    with torch.device("meta"):
        model = LLaDAV(cfg)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"cfg": cfg, "tower": count(model.vision_tower), "projector": count(model.mm_projector),
            "newline": model.image_newline.numel(), "all": count(model)}


def main():
    with tempfile.TemporaryDirectory() as root:
        folder = build_tiny_folder(root)
        files = sorted(os.listdir(folder))
        print(f"tiny folder: {', '.join(files[:3])},\n             {', '.join(files[3:])}")
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        first = ("hidden_size", "num_hidden_layers", "num_attention_heads")
        then = ("num_key_value_heads", "intermediate_size", "vocab_size")
        print(f"config.json: {', '.join(f'{k} {config[k]}' for k in first)},\n"
              f"             {', '.join(f'{k} {config[k]}' for k in then)}")
        model, _ = load_llada_v(folder)
    lm = model.cfg.lm
    print(f"loaded: LMConfig(vocab_size={lm.vocab_size}, d_model={lm.d_model}, "
          f"n_layers={lm.n_layers}, n_heads={lm.n_heads}, n_kv_heads={lm.n_kv_heads}, ...)")
    loaded = sum(p.numel() for p in model.lm.parameters())
    print(f"language model parameters: loaded {loaded:,}, your lm_parameters {lm_parameters(lm):,}")

    real = real_8b_counts()
    cfg = real["cfg"]
    print(f"LLaDA-V 8B: language model {lm_parameters(cfg.lm):,} + vision tower {real['tower']:,}\n"
          f"            + projector {real['projector']:,} + image_newline {real['newline']:,} = "
          f"{real['all']:,} parameters")
    print(f"weights in bf16: {real['all'] * BF16_BYTES / 1e9:.2f} GB")
    v = cfg.vision
    image = anyres_layout(PHOTO, cfg.grid_pinpoints, v.image_size, v.grid, cfg.max_crops).tokens
    L = image + PROMPT_TEXT_TOKENS + GEN_LENGTH
    print(f"a {PHOTO[0]} x {PHOTO[1]} photo: {image:,} image tokens; L = {image:,} + "
          f"{PROMPT_TEXT_TOKENS} prompt + {GEN_LENGTH} answer = {L:,} tokens")
    total = forward_flops(cfg.lm, L)
    quadratic = (forward_flops(cfg.lm, 2 * L) - 2 * total) // 2  # a L + b L^2: two lengths
    print(f"one forward pass over L: {total / 1e12:.2f} TFLOP (weight matrices "
          f"{(total - quadratic) / 1e12:.2f}, attention {quadratic / 1e12:.2f})")
    print(f"logits of one pass: L x {cfg.lm.vocab_size:,} x {BF16_BYTES} bytes = "
          f"{L * cfg.lm.vocab_size * BF16_BYTES / 1e9:.2f} GB in bf16")
    for speed in (1, 8):
        passes = steps_for(GEN_LENGTH, speed)
        print(f"{speed} token{'s' if speed > 1 else ''}/step: {passes} forward passes = "
              f"{passes * total / 1e15:.2f} PFLOP = {passes * total / GPU_FLOPS:.1f} s at "
              f"{GPU_FLOPS / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    try:
        main()
    except Todo as todo:
        sys.exit(f"not finished: a TODO is still there ({todo}); "
                 f"python workshop/check.py 6 shows where")
