"""finetune_llada_v.py: fine-tune a Hugging Face LLaDA-V / ReDiff folder on real caption data with
the masked-diffusion objective (Eq. 1) or ReDiff's Stage I foundational revision (Eq. 2-3), in one
process or under torchrun (DDP / FSDP2).

    python finetune_llada_v.py --hf-model LLaDA-V --data-json captions.json --image-root images \\
        --out out/rediff-s1 --optimizer adamw8bit --master-dtype bfloat16 --activation-checkpointing \\
        --grad-accum 8                                                            # one 80 GB GPU
    torchrun --nproc_per_node 8 finetune_llada_v.py --parallel fsdp --activation-checkpointing --hf-model LLaDA-V \\
        --data-json captions.json --image-root images --vicrit-jsonl vicrit.jsonl --batch-size 32 --out out/rediff-s1
    python sample.py --ckpt out/rediff-s1 --image photo.jpg --tokens-per-step 4

What it writes:
  --out   a Hugging Face folder in LLaDA-V's own layout (the source folder's config.json, tokenizer.json and other small
          files; safetensors shards under the checkpoint's key names; model.safetensors.index.json), which
          llada_v.load_llada_v and sample.py --ckpt read. Written at the end, beside and then swapped in.
  --dcp   the resumable training state (weights, Adam, step, loss history): a sharded DCP folder (distributed.py),
          every --save-every steps, at --stop-at and at the end. --resume continues it with any number of processes.

A row of a batch: the LLaDA chat prompt (one placeholder per image token, their number from the
image's anyres layout, then the question), the answer (caption, <|eot_id|>, then <|endoftext|> up to
--answer-len: LLaDA trains on that padding), then <|endoftext|> up to the longest row of its
micro-batch (visible, never masked or scored). Only the answer is masked, corrupted and scored, and
only the answer's positions get logits. Everything trains: the language model, projector and
image_newline at --lr, the vision tower at its own --vision-lr (the official scripts: 1e-6 against
5e-6; --vision-lr 0 freezes it).

A step: the global batch's masks and corruptions are drawn on its answers alone (one process's
draws, whatever the padding); each process takes its rows (distributed.py), in --grad-accum
micro-batches of batch_size / (processes x grad_accum) rows, each padded to its own longest row;
gradients add up over the micro-batches. One process with --grad-accum 2 and two with --grad-accum 1
run the same micro-batches, so they train the same weights.

Before any weights are loaded, the memory plan (memory_plan: weights, gradients, optimizer states,
activations per sample) is printed and a plan that does not fit the device is refused, naming flags
that make it fit.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import distributed
import rediff
from cli import UsageError, check_folder_out, option, parse_config, run_main, show_config
from data.loaders import (DataError, load_llava_json, load_vicrit_jsonl, load_vicrit_train,
                          open_image)
from llada_v import (CAPTION_QUESTION, EOS_ID, EOT_ID, MASK_ID, LLaDAV, anyres_layout,
                     checkpoint_names, config_from_hf, load_llada_v, prompt_ids)
from sample import check_hf_folder
from train_stage1 import warmup_cosine

STATE_FILE = "finetune_state.json"  # in --out: step, settings and loss history (not meta.json: that marks DCP folders)


@dataclass
class FinetuneConfig:
    hf_model: str = option("", "required: a Hugging Face LLaDA-V / ReDiff folder (config.json, tokenizer.json, "
                           "safetensors shards), e.g. from huggingface-cli download GSAI-ML/LLaDA-V --local-dir DIR")
    data_json: str = option("", "required: LLaVA / ShareGPT4V conversation JSON; the first human turn is the "
                            "question, the first assistant turn after it the reference caption")
    image_root: str = option("", "folder the data's image paths are relative to (empty: the folder of --data-json)")
    vicrit_train_json: str = option("", "--objective revision: ViCrit-Train as released (a JSON list with "
                                    "original_caption, changed_caption, solution_*); a pair is kept when both "
                                    "captions and both solutions have the same token count")
    vicrit_jsonl: str = option("", "--objective revision: ViCrit-style hallucination pairs (JSONL with image, caption, "
                               "hallucinated); a pair is kept when both captions have the same token count")
    skip_missing: bool = option(False, "skip (and count) records whose image file is missing instead of stopping")
    skip_bad: bool = option(False, "skip (and count) malformed records instead of stopping")
    objective: str = option("revision", "revision: Stage I typed losses (Eq. 2-3); mask: plain masked diffusion "
                            "(Eq. 1, the mask-trained baseline)", choices=["revision", "mask"])
    replace_prob: float = option(0.1, "Stage I: chance that a visible answer token is replaced by a random ordinary "
                                 "token (paper 0.1, official code 0.05)", at_least=0, at_most=1)
    t_dependent: bool = option(False, "Stage I: replacement rate min(t, replace_prob) instead of fixed (Table 5)")
    hallucination_frac: float = option(0.25, "Stage I with --vicrit-jsonl: share of each batch that is ViCrit pairs",
                                       at_least=0, at_most=1)
    answer_len: int = option(128, "answer tokens per row: caption, <|eot_id|>, <|endoftext|> padding (longer "
                             "captions are cut and counted); the paper generates 128", at_least=2)
    out: str = option("out/llada-v-stage1", "Hugging Face folder to write at the end (sample.py --ckpt reads it)")
    dcp: str = option("", "training-state folder (DCP) for --resume; empty: --out with .dcp added")
    save_every: int = option(500, "steps between training-state saves to --dcp", at_least=1)
    stop_at: int = option(0, "stop (with a --dcp save) after this step, as an interruption would; 0: run to --steps",
                          at_least=0)
    resume: bool = option(False, "continue the run saved at --dcp: weights, optimizer, schedule and data position")
    steps: int = option(0, "optimizer steps; 0: one pass over the captions of --data-json (the paper: 1 epoch)",
                        at_least=0)
    batch_size: int = option(32, "samples per step, all processes together (a multiple of their number)",
                             at_least=1)
    lr: float = option(5e-6, "peak learning rate (AdamW; the paper's 5e-6)", more_than=0)
    min_lr_frac: float = option(0.0, "the cosine schedule ends at lr * min_lr_frac",
                                at_least=0, at_most=1)
    warmup_frac: float = option(0.03, "share of the steps spent in linear warm-up (the paper: 3 percent)",
                                at_least=0, at_most=1)
    weight_decay: float = option(0.0, "AdamW weight decay", at_least=0)
    grad_clip: float = option(1.0, "gradient-norm clip", more_than=0)
    seed: int = option(0, "seed for the data order, masks and corruptions", at_least=0)
    device: str = option("auto", "auto (cuda, mps, cpu), cpu, cuda or mps")
    parallel: str = option("auto", "several processes (torchrun --nproc_per_node N): ddp (a full replica per rank) or "
                           "fsdp (FSDP2: parameters, gradients and Adam states sharded); auto: ddp under torchrun, "
                           "none otherwise", choices=["auto", "none", "ddp", "fsdp"])
    param_dtype: str = option("auto", "compute dtype (master weights and Adam stay float32): auto = bfloat16 on CUDA "
                              "(fsdp: gathered parameters; none / ddp: autocast), float32 elsewhere",
                              choices=["auto", "bfloat16", "float32"])
    activation_checkpointing: bool = option(False, "recompute each transformer block's activations in the backward "
                                            "pass (less memory, about 1/3 more compute)")
    save_dtype: str = option("bfloat16", "dtype of the --out shards: bfloat16 (the released checkpoints' own) or "
                             "float32 (exactly the trained weights)", choices=["bfloat16", "float32"])
    shard_gb: float = option(5.0, "largest --out shard in GB", more_than=0)
    vision_lr: float = option(1e-6, "peak learning rate of the vision tower (the official scripts: 1e-6 while the "
                              "rest trains at 5e-6); 0 freezes the tower", at_least=0)
    optimizer: str = option("adamw", "adamw: torch AdamW (states in the weights' dtype: 8 bytes a parameter in "
                            "float32); adamw8bit: torchao's AdamW8bit (about 2 bytes a parameter)",
                            choices=["adamw", "adamw8bit"])
    master_dtype: str = option("float32", "dtype of the trained weights and their gradients: float32, or bfloat16 "
                               "(half the memory; needs --optimizer adamw8bit, whose bf16 stochastic rounding "
                               "keeps updates far below bf16's resolution)",
                               choices=["float32", "bfloat16"])
    grad_accum: int = option(1, "micro-batches per step in each process: batch_size / (processes x grad_accum) "
                             "rows are run at once, their gradients added up", at_least=1)
    device_memory_gib: float = option(0.0, "memory of one device in GiB for the memory plan; 0: the device's own "
                                      "(a GPU's total memory, or the host's RAM for cpu)",
                                      at_least=0)
    plan_image: str = option("640x480", "WIDTHxHEIGHT of the image the memory plan assumes for a sample's tokens "
                             "(its anyres layout sets the sequence length)")
    ignore_memory_plan: bool = option(False, "go on when the memory plan does not fit (it is an estimate)")
    save: bool = option(True, "write --dcp and --out; --no-save trains and writes nothing (a smoke test, as "
                        "tools/gpu_check.py runs it)")


# ----------------------------------------------------------------------------------------------------------------
# Data: a fixed global order, batches of token ids for all rows and image views for this rank's rows


@functools.lru_cache(maxsize=4)
def shuffled(n: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def take(records: list, seed: int, stream: int, start: int, count: int) -> list:
    """Items start .. start + count - 1 of an endless sequence of shuffled passes over `records`."""
    return [records[shuffled(len(records), seed, stream, pos // len(records))[pos % len(records)]]
            for pos in range(start, start + count)]


@dataclass
class Batch:
    """A global batch at the level of its answers: what the masks and corruptions are drawn on (the
    same draws however the rows are padded, spread over processes or split into micro-batches)."""
    records: list               # B data records (image_path, prompt, caption ...)
    answers: torch.Tensor       # (B, A) caption, <|eot_id|>, <|endoftext|> padding
    wrong: torch.Tensor         # (B, A) the hallucinated answer of pair rows, else the answer

    @property
    def wrong_span(self) -> torch.Tensor:                                            # (B, A) bool
        return self.wrong != self.answers


@dataclass
class Rows:
    """Some rows of a global batch as the model sees them: padded to their own longest row."""
    ids: torch.Tensor           # (b, L) prompt (placeholders), answer input, <|endoftext|> padding
    answer_at: torch.Tensor     # (b, A) each answer position, counted from `start`
    start: int                  # the first answer position of these rows: the model's logits_from
    views: torch.Tensor         # (sum n, 3, S, S): the anyres views of these rows' images
    sizes: list                 # their (width, height)

    def to(self, device):
        return Rows(self.ids.to(device), self.answer_at.to(device), self.start,
                    self.views.to(device), self.sizes)


class CaptionData:
    """Step s takes the next batch_size - k captions of an endless sequence of shuffled passes, and
    k = round(hallucination_frac x batch_size) hallucination pairs (ViCrit, revise records) from a
    second one: a batch depends only on (seed, step)."""

    def __init__(self, captions: list, pairs: list, model, tokenizer, cfg: FinetuneConfig):
        self.captions, self.model, self.tokenizer, self.cfg = captions, model, tokenizer, cfg
        self.stats = {"captions_cut": 0, "pairs_dropped_token_counts_differ": 0}
        self.pairs = []
        for record in pairs:  # tokenised once: usable when both captions have the same token count
            right, wrong = tokenizer.encode(record["caption"]), tokenizer.encode(record["wrong"])
            solutions = [tokenizer.encode(text) for text in record.get("solutions", [])]  # ViCrit
            if len(right) == len(wrong) and len({len(ids) for ids in solutions}) <= 1:
                self.pairs.append(dict(record, ids=right, wrong_ids=wrong))
            else:
                self.stats["pairs_dropped_token_counts_differ"] += 1
        self.sizes: dict[str, tuple] = {}

    def image_size(self, path: str) -> tuple[int, int]:
        """(width, height) from the file header (no decoding): a row's placeholder count."""
        if path not in self.sizes:
            try:
                with Image.open(path) as im:
                    self.sizes[path] = im.size
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot read the image header ({err}); replace the file or remove its "
                                f"record") from None
        return self.sizes[path]

    def answer(self, ids: list[int], count: bool = True) -> list[int]:
        """Caption ids -> exactly answer_len ids: caption, <|eot_id|>, <|endoftext|> padding; a longer caption is cut
        (no end of turn: it did not end)."""
        n = self.cfg.answer_len
        if len(ids) >= n:
            self.stats["captions_cut"] += count
            return ids[:n]
        return ids + [EOT_ID] + [EOS_ID] * (n - len(ids) - 1)

    def records(self, step: int, batch_size: int) -> list[dict]:
        k = round(self.cfg.hallucination_frac * batch_size) if self.pairs else 0
        return (take(self.captions, self.cfg.seed, 0, step * (batch_size - k), batch_size - k)
                + take(self.pairs, self.cfg.seed, 1, step * k, k))

    def batch(self, step: int, batch_size: int) -> Batch:
        """The global batch of `step`: its records and their answers (B, A)."""
        records = self.records(step, batch_size)
        answers = [self.answer(r["ids"] if "ids" in r else self.tokenizer.encode(r["caption"]))
                   for r in records]
        wrongs = [self.answer(r["wrong_ids"], count=False) if "wrong_ids" in r else a
                  for r, a in zip(records, answers)]
        return Batch(records, torch.tensor(answers), torch.tensor(wrongs))

    def rows(self, batch: Batch, inputs: torch.Tensor, rows: slice) -> Rows:
        """Rows `rows` of the global batch with `inputs` (B, A) in their answers: prompts (their
        image-token counts from the file headers), padding to these rows' longest, and their images
        decoded."""
        records = batch.records[rows]
        counts = [self.model.n_image_tokens(self.image_size(r["image_path"])) for r in records]
        prompts = [prompt_ids(self.tokenizer, n, r.get("prompt") or CAPTION_QUESTION)
                   for n, r in zip(counts, records)]
        ids, answer_at, start = pack_rows(prompts, inputs[rows])
        views, sizes = image_views(self.model, [r["image_path"] for r in records])
        return Rows(ids, answer_at, start, views, sizes)


def pack_rows(prompts: list, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts (lists of ids) and answers (b, A) -> (rows (b, L): prompt, answer, <|endoftext|> up
    to the longest row; answer_at (b, A): the answer positions counted from start; start: the first
    answer position of any row, from where the model computes logits)."""
    lengths = torch.tensor([len(p) for p in prompts])                                # (b,)
    A = answers.shape[1]
    ids = torch.full((len(prompts), int(lengths.max()) + A), EOS_ID)                 # (b, L)
    for b, prompt in enumerate(prompts):
        ids[b, :len(prompt)] = torch.tensor(prompt)
        ids[b, len(prompt):len(prompt) + A] = answers[b]
    start = int(lengths.min())
    answer_at = (lengths - start)[:, None] + torch.arange(A)[None, :]               # (b, A)
    return ids, answer_at, start


def micro_batches(n_rows: int, ctx, grad_accum: int) -> list[slice]:
    """This process's rows of a global batch of n_rows, in grad_accum consecutive micro-batches of
    equal size: micro-batch j of rank r holds global rows (r grad_accum + j) m .. + m - 1, m =
    n_rows / (world grad_accum)."""
    mine = ctx.rows(n_rows)
    m, rest = divmod(mine.stop - mine.start, grad_accum)
    if rest or not m:
        raise SystemExit(f"--batch-size {n_rows} does not split into {ctx.world} process(es) x "
                         f"--grad-accum {grad_accum} equal micro-batches; make it a multiple of "
                         f"{ctx.world * grad_accum}")
    return [slice(mine.start + j * m, mine.start + (j + 1) * m) for j in range(grad_accum)]


def image_views(model, paths: list) -> tuple[torch.Tensor, list]:
    """Decode image files -> (their anyres views concatenated (sum n, 3, S, S), their (width, height))."""
    images = [open_image(path) for path in paths]
    return torch.cat([model.image_views(im) for im in images]), [im.size for im in images]


def load_data(cfg: FinetuneConfig) -> tuple[list, list]:
    """-> (captions, hallucination pairs). Records of --data-json with ReDiff's "revise" corrections
    hold a wrong answer: they are pairs (with --objective mask: captions, their corrected text),
    never captions to learn as written. --vicrit-jsonl and --vicrit-train-json add pairs."""
    root = cfg.image_root or os.path.dirname(os.path.abspath(cfg.data_json))
    args = (root, cfg.skip_missing, cfg.skip_bad)
    try:
        records, stats = load_llava_json(cfg.data_json, *args)
        pairs, pair_stats = [], {}
        if cfg.vicrit_jsonl:
            pairs, pair_stats = load_vicrit_jsonl(cfg.vicrit_jsonl, *args)
        if cfg.vicrit_train_json:
            more, more_stats = load_vicrit_train(cfg.vicrit_train_json, *args)
            pairs += more
            pair_stats = {k: pair_stats.get(k, 0) + v for k, v in more_stats.items()}
    except DataError as err:
        # the loaders name their keyword arguments; here they are flags
        raise SystemExit(str(err).replace("skip_missing=True", "--skip-missing").replace("skip_bad=True", "--skip-bad")
                         .replace("allow_outside_root=True", "an --image-root that holds it")) from None
    except FileNotFoundError as err:
        raise SystemExit(f"{err.filename}: file not found; check --data-json / --vicrit-jsonl / "
                         f"--vicrit-train-json") from None
    revised = [r for r in records if "revise" in r]
    captions = [r for r in records if "revise" not in r]
    if cfg.objective == "mask":
        captions += [{k: v for k, v in r.items() if k not in ("wrong", "revise")} for r in revised]
    else:
        pairs = revised + pairs
    if revised:
        print(f"{len(revised)} records of {cfg.data_json} carry \"revise\" corrections: "
              + ("their corrected captions train as captions" if cfg.objective == "mask"
                 else "hallucination pairs (assistant turn as written -> corrected)"))
    if not captions:
        raise SystemExit(f"{cfg.data_json}: no usable caption record ({stats}); fix the data or --image-root")
    print(f"{len(captions)} captions (skipped {stats}), {len(pairs)} hallucination pairs (skipped {pair_stats})")
    return captions, pairs

# ----------------------------------------------------------------------------------------------------------------
# Loss, schedule, checkpoints


def corrupt(batch: Batch, cfg: FinetuneConfig, ordinary_ids, generator) -> dict:
    """Eq. 1's masks (--objective mask) or Section 3.2's masks, syntax errors and hallucinations
    (revision), drawn on the whole global batch's answers (B, A) on the CPU: the same draws in any
    number of processes, with any padding. -> {"inputs": (B, A), "p": (B,), and "is_masked" (mask)
    or "types" (revision): (B, A)}."""
    answer_mask = torch.ones_like(batch.answers, dtype=torch.bool)                  # (B, A)
    if cfg.objective == "mask":
        inputs, is_masked, p = rediff.forward_mask(batch.answers, answer_mask, MASK_ID,
                                                   generator=generator)
        return {"inputs": inputs, "is_masked": is_masked, "p": p}
    inputs, _, types, p = rediff.corrupt_for_revision(
        batch.answers, answer_mask, MASK_ID, ordinary_ids, cfg.replace_prob, cfg.t_dependent,
        batch.wrong, batch.wrong_span, generator=generator)
    return {"inputs": inputs, "types": types, "p": p}


def answer_logits(model, rows: Rows) -> torch.Tensor:
    """The logits of the answer positions only, (b, A, V). The model computes logits from rows.start
    on; a forward pre-hook on the final norm keeps just each row's A answer positions, so the norm
    and the LM head (V = 126k columns) never see the gap between a short prompt's start and a long
    one's, nor the right padding."""
    lm = getattr(model, "module", model).lm                          # DDP keeps it in .module
    index = rows.answer_at[..., None]                                               # (b, A, 1)

    def gather(module, args):
        x = args[0]                                                  # (b, L - start, D)
        return (x.gather(1, index.expand(-1, -1, x.shape[-1])),)                    # (b, A, D)
    handle = lm.norm.register_forward_pre_hook(gather)
    try:
        return model(rows.ids, views=rows.views, image_sizes=rows.sizes, logits_from=rows.start)
    finally:
        handle.remove()


def training_loss(model, data: CaptionData, batch: Batch, noisy: dict, rows: slice,
                  cfg: FinetuneConfig, device) -> tuple[torch.Tensor, dict]:
    """The loss of rows `rows` of the global batch (a micro-batch of this process) -> (loss, {part:
    value}). Per-row means (Eq. 1: each sample's sum over its answer length; Eq. 2-3: each type's
    mean in each row), averaged over the rows: equal micro-batches average to the whole batch's
    loss."""
    part = data.rows(batch, noisy["inputs"], rows).to(device)
    logits = answer_logits(model, part)                                             # (b, A, V)
    targets, p = batch.answers[rows].to(device), noisy["p"][rows].to(device)
    if cfg.objective == "mask":
        is_masked = noisy["is_masked"][rows].to(device)
        everywhere = torch.ones_like(is_masked)                                     # (b, A)
        loss = rediff.masked_diffusion_loss(logits, targets, is_masked, p, everywhere)
        return loss, {"mask": loss}
    return rediff.typed_losses(logits, targets, noisy["types"][rows].to(device), p)


def set_learning_rate(optimizer, step: int, cfg: FinetuneConfig) -> None:
    """The warm-up + cosine schedule, each parameter group at its own scale (the vision tower's
    --vision-lr)."""
    for group in optimizer.param_groups:
        lr = learning_rate(step, cfg) * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):  # torchao keeps it in a tensor (compiled step)
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def learning_rate(step: int, cfg: FinetuneConfig) -> float:
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    return warmup_cosine(step, cfg.steps, warmup, cfg.lr, cfg.min_lr_frac)


def export_hf(path: str, model, ctx, cfg: FinetuneConfig, state: dict) -> None:
    """Write the weights as a Hugging Face LLaDA-V folder (the inverse of llada_v.load_llada_v): LLaMA-style key
    names (llada_v.checkpoint_names; timm's fused qkv split back into q, k, v), shards of at most --shard-gb and
    their index, the source folder's small files (config.json, tokenizer.json, ...) and STATE_FILE. Every rank calls
    this (FSDP gathers the weights to rank 0's CPU); rank 0 writes PATH.tmp and swaps it in."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if ctx.mode == "fsdp":
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights = model.state_dict()
    if ctx.is_main:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.save_dtype]
        tensors = {}
        for ours, keys in checkpoint_names(model.cfg, "llama").items():
            t = weights[ours].detach().to("cpu", dtype)
            t = t[0] if ours.endswith("pos_embed") else t                              # timm (1, g^2, Dv) -> (g^2, Dv)
            tensors.update({key: part.contiguous() for key, part in zip(keys, t.chunk(len(keys)))})
        shards, size = [[]], 0
        for key, t in tensors.items():                                                   # fill shards in key order
            if shards[-1] and size + t.nbytes > cfg.shard_gb * 1e9:
                shards, size = shards + [[]], 0
            shards[-1].append(key)
            size += t.nbytes
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in sorted(os.listdir(cfg.hf_model)):                                    # config.json, tokenizer.json..
            src = os.path.join(cfg.hf_model, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name not in (
                    "model.safetensors.index.json", "meta.json", STATE_FILE):
                shutil.copy(src, tmp)
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"source": os.path.abspath(cfg.hf_model), **state}, f)
        distributed.swap_in_folder(tmp, path)
    ctx.barrier()


def check_resume(cfg: FinetuneConfig, meta: dict, world: int = 1) -> None:
    """Refuse a resume that cannot continue the run; note settings that make it differ from an
    uninterrupted one. --grad-accum may change with the number of processes: the micro-batches stay
    the same while processes x grad_accum does."""
    run, flag = meta.get("train_config", {}), lambda k: "--" + k.replace("_", "-")  # noqa: E731
    conflicts = [f"{flag(k)} {getattr(cfg, k)} but the run used {run[k]}"
                 for k in ("objective", "answer_len", "optimizer", "master_dtype")
                 if k in run and run[k] != getattr(cfg, k)]
    if conflicts:
        raise SystemExit(f"--resume {cfg.dcp}: {'; '.join(conflicts)}. Fix: repeat the run's own flags")
    free = {"resume", "stop_at", "out", "dcp", "save_every", "device", "parallel", "activation_checkpointing",
            "param_dtype", "save_dtype", "shard_gb", "hf_model", "grad_accum", "device_memory_gib", "plan_image",
            "ignore_memory_plan", "save"}
    changed = [f"{flag(k)} {getattr(cfg, k)} (was {v})" for k, v in run.items()
               if k not in free and hasattr(cfg, k) and getattr(cfg, k) != v]
    before = meta.get("written_by_processes", 1) * run.get("grad_accum", 1)
    if world * cfg.grad_accum != before:
        changed.append(f"processes x --grad-accum {world} x {cfg.grad_accum} (was {before} in all: other "
                       f"micro-batches, other padding)")
    if changed:
        print(f"note: resuming with other settings than the run's: {', '.join(changed)}; the continuation will not "
              f"match an uninterrupted run")


# ----------------------------------------------------------------------------------------------------------------
# The memory plan: what one device holds, computed from the config and the flags before any weight
# is loaded

GIB = 2 ** 30
TEXT_TOKENS = 80            # the chat template and a short question, in tokens (an estimate)
OVERHEAD_BYTES = 2 * GIB    # CUDA context, allocator slack, temporary buffers (an estimate)
BLOCK_8BIT = 256            # torchao's AdamW8bit: one float32 scale per 256 values of each state
STORED_PER_TOKEN = (10, 4)  # a block keeps about 10 D + 4 F values a token for its backward pass:
#                             norms, q, k, v, attention output, residuals (D each); gate, up, SiLU
#                             and their product (F each)


@dataclass
class MemoryPlan:
    """Bytes one device holds during a training step, by part, and what they are made of."""
    parts: dict                 # {name: bytes}: weights, gradients, optimizer, activations, ...
    per_sample: int             # activation bytes of one sample (included in parts["activations"])
    micro_batch: int            # samples run at once on one device
    seq_len: int                # tokens of the planned sample: text, image, answer
    device_bytes: int
    notes: list                 # how the numbers were computed

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    def text(self) -> str:
        lines = ["memory plan (computed from config.json and the flags; an estimate), per device:"]
        lines += [f"  {name:<22} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        lines += [f"  {'total':<22} {self.total / GIB:8.2f} GiB of {self.device_bytes / GIB:.2f} GiB: "
                  f"{'fits' if self.fits else 'DOES NOT FIT'}",
                  f"  activations: {self.per_sample / GIB:.2f} GiB a sample x {self.micro_batch} a micro-batch; "
                  f"a sample is {self.seq_len} tokens"]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


_COUNTED: dict[str, tuple] = {}  # repr(config) -> parameter_counts(config)


def parameter_counts(config) -> tuple[int, int, int]:
    """(all, vision tower, the root FSDP unit: embeddings, LM head, projector) parameters of the
    model a llada_v.LLaDAVConfig describes, counted on the meta device (no memory; once per config).
    """
    key = repr(config)
    if key not in _COUNTED:
        with torch.device("meta"):
            model = LLaDAV(config)
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        tower = count(model.vision_tower) if config.vision is not None else 0
        _COUNTED[key] = (count(model), tower, count(model) - tower - count(model.lm.layers))
    return _COUNTED[key]


def image_layout_counts(config, image_size: tuple[int, int]) -> tuple[int, int]:
    """(image tokens, views the tower sees) of an image of this (width, height) (llada_v's anyres
    rules)."""
    v = config.vision
    if config.image_aspect_ratio == "pad":
        return v.grid ** 2 + 1, 1
    layout = anyres_layout(image_size, config.grid_pinpoints, v.image_size, v.grid,
                           config.max_crops)
    return layout.tokens, 1 + layout.rows * layout.cols


def memory_plan(config, flags, device_bytes: int, world: int = 1, device_type: str = "cuda",
                image_size: tuple[int, int] = (640, 480)) -> MemoryPlan:
    """The memory one device needs to train the model of `config` (llada_v.LLaDAVConfig) with
    `flags` (a FinetuneConfig: optimizer, master_dtype, param_dtype, parallel,
    activation_checkpointing, batch_size, grad_accum, answer_len, vision_lr; a Stage2Config adds
    gen_length and the drafting replica) in `world` processes: weights, their compute copies,
    gradients, optimizer states, activations of a micro-batch of samples of image_size, and a fixed
    overhead. Pure arithmetic; the per-token activation count is an estimate."""
    n_all, n_tower, n_root = parameter_counts(config)
    n_train = n_all - (0 if flags.vision_lr > 0 else n_tower)
    mode = flags.parallel if flags.parallel != "auto" else ("ddp" if world > 1 else "none")
    shard = world if mode == "fsdp" else 1
    master = 2 if flags.master_dtype == "bfloat16" else 4
    fp32 = flags.param_dtype == "float32" or (flags.param_dtype == "auto" and device_type != "cuda")
    compute = 4 if fp32 else 2
    lm, n_layers = config.lm, config.lm.n_layers
    parts = {"weights": n_all * master // shard}
    if mode == "fsdp":  # gathered in the compute dtype: the root unit, and two layers at a time
        parts["gathered weights"] = (n_root + 2 * (n_all - n_tower - n_root) // n_layers) * compute
    elif compute < master:  # autocast keeps a compute-dtype copy of every weight for backward
        parts["compute copies"] = n_all * compute
    parts["gradients"] = n_train * master // shard
    if mode == "ddp":
        parts["DDP gradient buckets"] = n_train * master
    per_param = 2 * master if flags.optimizer == "adamw" else 2 + 2 * 4 / BLOCK_8BIT
    parts["optimizer states"] = int(n_train * per_param) // shard
    # activations of one sample
    answer = max(flags.answer_len, getattr(flags, "gen_length", 0))
    image_tokens, views = image_layout_counts(config, image_size)
    seq = TEXT_TOKENS + image_tokens + answer
    d, f = STORED_PER_TOKEN
    block = (d * lm.d_model + f * lm.mlp_hidden) * compute          # bytes a token, one layer
    if flags.activation_checkpointing:  # block inputs, and one block while it is recomputed
        act = seq * n_layers * lm.d_model * compute + seq * block
    else:
        act = seq * n_layers * block
    act += answer * lm.vocab_size * (compute + 8)  # answer logits, float32 log-softmax, gradient
    v = config.vision
    tokens = views * v.grid ** 2
    act += tokens * (v.width + 2 * lm.d_model) * compute            # the projector's inputs
    if flags.vision_lr > 0:
        v_block = (d * v.width + f * v.mlp_hidden) * compute
        if flags.activation_checkpointing:
            act += tokens * v.used_layers * v.width * compute + tokens * v_block
        else:
            act += tokens * v.used_layers * v_block
    micro = max(1, flags.batch_size // (world * flags.grad_accum))
    parts["activations"] = micro * act
    parts["overhead"] = OVERHEAD_BYTES
    notes = [f"{n_all / 1e9:.2f} B parameters ({n_train / 1e9:.2f} B trained), {mode} over {world} "
             f"process(es), weights {flags.master_dtype}, "
             f"compute {'bfloat16' if compute == 2 else 'float32'}, "
             f"optimizer {flags.optimizer}, image {image_size[0]}x{image_size[1]} ({views} views)"]
    if hasattr(flags, "gen_length") and mode == "fsdp":  # Stage II drafts with a whole replica
        replica = n_all * compute
        drafting = sum(v for k, v in parts.items() if k != "activations") + replica
        if drafting > sum(parts.values()):
            parts["drafting replica"] = drafting - sum(parts.values())
        notes.append(f"Stage II drafting adds a {replica / GIB:.1f} GiB replica (training activations are "
                     f"free then); counted where it is the larger peak")
    return MemoryPlan(parts, act, micro, seq, int(device_bytes), notes)


def fitting_flags(config, flags, device_bytes: int, world: int, device_type: str = "cuda",
                  image_size: tuple[int, int] = (640, 480)) -> list[str] | None:
    """The flags, added one after the other, with which the plan fits; None when even all of them do
    not."""
    trials = [("--activation-checkpointing", {"activation_checkpointing": True}),
              ("--optimizer adamw8bit", {"optimizer": "adamw8bit"}),
              ("--master-dtype bfloat16", {"master_dtype": "bfloat16"})]
    rows = flags.batch_size // world
    trials += [(f"--grad-accum {k}", {"grad_accum": k})
               for k in range(flags.grad_accum + 1, rows + 1) if rows % k == 0]
    trials.append(("--vision-lr 0", {"vision_lr": 0.0}))
    added, current = [], flags
    for flag, change in trials:
        if all(getattr(current, k) == v for k, v in change.items()):
            continue
        current = dataclasses.replace(current, **change)
        if flag.startswith("--grad-accum"):  # a larger value replaces the last one tried
            added = [a for a in added if not a.startswith("--grad-accum")]
        added.append(flag)
        if memory_plan(config, current, device_bytes, world, device_type, image_size).fits:
            return added
    return None


def device_memory(device: torch.device, cfg) -> int:
    """Bytes of one device: --device-memory-gib, else a GPU's total memory, else the host's RAM."""
    if cfg.device_memory_gib:
        return int(cfg.device_memory_gib * GIB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """"640x480" -> (640, 480), or a one-line error naming the flag."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
        if width > 0 and height > 0:
            return width, height
    except ValueError:
        pass
    raise UsageError(f"{flag} {text!r}: give WIDTHxHEIGHT in pixels, e.g. 640x480")


def check_memory(cfg, ctx) -> MemoryPlan:
    """Print the memory plan from --hf-model's config.json and the flags; refuse one that does not
    fit, naming the flags that would make it fit (--ignore-memory-plan goes on regardless)."""
    path = os.path.join(cfg.hf_model, "config.json")
    with open(path) as f:
        config = config_from_hf(json.load(f), path)
    if config.vision is None:
        raise SystemExit(f"--hf-model {cfg.hf_model} is a text-only LLaDA checkpoint: captioning needs LLaDA-V")
    image = parse_size(cfg.plan_image, "--plan-image")
    args = (device_memory(ctx.device, cfg), ctx.world, ctx.device.type, image)
    plan = memory_plan(config, cfg, *args)
    print(plan.text())
    if plan.fits or cfg.ignore_memory_plan:
        return plan
    fix = fitting_flags(config, cfg, *args)
    advice = (f"add {' '.join(fix)}" if fix else "no flag of this script makes it fit on one device: "
              "use more GPUs (torchrun --nproc_per_node N ... --parallel fsdp)")
    raise SystemExit(f"memory plan: {plan.total / GIB:.1f} GiB per device, but {ctx.device} has "
                     f"{plan.device_bytes / GIB:.1f} GiB; {advice} (or --ignore-memory-plan to try anyway)")


# ----------------------------------------------------------------------------------------------------------------
# Start-up pieces (finetune_llada_v_stage2.py uses them too)


def check_inputs(cfg, script: str) -> None:
    """--hf-model and --data-json are given, and the folder has config.json and tokenizer.json."""
    for name, path in (("--hf-model", cfg.hf_model), ("--data-json", cfg.data_json)):
        if not path:
            raise SystemExit(f"{name} is required (python {script} --help)")
    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(cfg.hf_model, name)):
            raise SystemExit(f"--hf-model {cfg.hf_model}: no {name}; give a downloaded LLaDA-V / ReDiff folder "
                             f"(huggingface-cli download GSAI-ML/LLaDA-V --local-dir DIR)")


def ordinary_ids(model, tokenizer, device) -> torch.Tensor:
    """Every id of the vocabulary that is not special: Stage I's random replacement tokens."""
    special = set(tokenizer.special_ids)
    vocab = min(tokenizer.tok.get_vocab_size(), model.cfg.lm.vocab_size)
    return torch.tensor([i for i in range(vocab) if i not in special], device=device)


def make_optimizer(groups: list, cfg):
    """AdamW over the parameter groups: torch's (states in the weights' dtype), or torchao's
    AdamW8bit (block-wise 8-bit states; with bfloat16 weights it rounds each update stochastically,
    so that a step of lr 5e-6 is not lost to bf16's 8-bit mantissa)."""
    betas = (0.9, 0.999)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    try:  # imported here: an optional dependency whose import takes seconds
        from torchao.optim import AdamW8bit
    except ImportError:
        raise SystemExit("--optimizer adamw8bit needs torchao: pip install -r requirements.txt") \
            from None
    return AdamW8bit(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                     bf16_stochastic_round=cfg.master_dtype == "bfloat16")


def prepare_training(model, ctx, cfg):
    """Set what trains (everything; the vision tower only with --vision-lr > 0), wrap (DDP / FSDP2 /
    the model itself, with activation checkpointing), build the optimizer with the tower in a group
    of its own -> (train_model, params, optimizer)."""
    tower_trains = cfg.vision_lr > 0
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(tower_trains)
    model.train()
    if cfg.activation_checkpointing and tower_trains:  # a trained tower stores 26 layers a crop
        distributed.checkpoint_blocks(model.vision_tower.trunk.blocks)
    train_model = distributed.wrap(model, ctx, cfg.param_dtype, cfg.activation_checkpointing)  # DDP / FSDP2 / model
    tower = {id(p) for p in model.vision_tower.parameters()}  # after wrap: FSDP2 shards them
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in tower], "lr_scale": 1.0}]
    if tower_trains:
        groups.append({"params": [p for p in params if id(p) in tower],
                       "lr_scale": cfg.vision_lr / cfg.lr})
    optimizer = make_optimizer(groups, cfg)
    count = lambda ps: sum(p.numel() for p in ps) / 1e9  # noqa: E731  (a DTensor shard counts as its whole tensor)
    print(f"model {count(model.parameters()):.3f} B parameters ({count(params):.3f} B trainable) on {ctx.device}, "
          f"{ctx.world} process(es), parallel {ctx.mode}, optimizer {cfg.optimizer}, weights {cfg.master_dtype}")
    return train_model, params, optimizer


def load_state(cfg, model, optimizer) -> dict:
    """--resume: weights and Adam state from --dcp (resharded to this run's processes); returns its meta.json."""
    tensor_lr = [isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups]
    try:
        meta = distributed.load_dcp_weights(cfg.dcp, model)
        distributed.load_dcp_optimizer(cfg.dcp, model, optimizer)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--resume: {err}. Fix: point --dcp (or --out) at a run of this script") from None
    for group, was_tensor in zip(optimizer.param_groups, tensor_lr):  # saved as numbers
        if was_tensor and not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]))
    return meta


def save_state(cfg, model, optimizer, meta: dict, ctx) -> None:
    """distributed.save_dcp, with learning rates that torchao keeps in tensors written as numbers
    (meta.json)."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = float(group["lr"])
    try:
        distributed.save_dcp(cfg.dcp, model, optimizer, meta, ctx)
    finally:
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr


def autocast_for(cfg, ctx):
    """bf16 autocast on CUDA without FSDP (FSDP2 casts through its MixedPrecisionPolicy instead); else nothing."""
    dtype = distributed.resolve_dtype(cfg.param_dtype, ctx.device)
    return (torch.autocast(ctx.device.type, dtype=dtype) if dtype != torch.float32 and ctx.mode != "fsdp"
            else nullcontext())

MASTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_optimizer_flags(cfg) -> None:
    """bfloat16 weights need the stochastic rounding of --optimizer adamw8bit: with plain rounding a
    step of lr 5e-6 is below half of bf16's spacing for most weights and is lost."""
    if cfg.master_dtype == "bfloat16" and cfg.optimizer != "adamw8bit":
        raise UsageError("--master-dtype bfloat16 needs --optimizer adamw8bit (its bf16 stochastic rounding keeps "
                         "the small updates that plain rounding to bf16 would drop)")


def accumulate(train_model, ctx, micro: list, autocast, loss_of) -> tuple[torch.Tensor, dict]:
    """Gradient accumulation: loss_of(rows) -> (loss, parts) for each micro-batch, each backward
    scaled by 1/len(micro) so that the gradients add up to the mean's; DDP synchronises on the last
    micro-batch only. Returns this process's mean loss and parts over its micro-batches (detached).
    """
    total, sums = 0.0, {}
    for j, rows in enumerate(micro):
        last = j == len(micro) - 1
        sync = train_model.no_sync() if ctx.mode == "ddp" and not last else nullcontext()
        with sync:
            with autocast:
                loss, parts = loss_of(rows)
            (loss / len(micro)).backward()
        total = total + loss.detach() / len(micro)
        sums = {k: sums.get(k, 0.0) + v.detach() / len(micro) for k, v in parts.items()}
    return total, sums


def report_peak_memory(plan: MemoryPlan, device) -> None:
    """On CUDA: the measured peak beside the plan's total."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        print(f"peak memory allocated {peak / GIB:.2f} GiB (reserved {reserved / GIB:.2f} GiB); "
              f"the plan said {plan.total / GIB:.2f} GiB")


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(FinetuneConfig, argv, description=__doc__.split("\n\n")[0])
    check_inputs(cfg, "finetune_llada_v.py")
    check_hf_folder(cfg.hf_model, "--hf-model")
    check_folder_out(cfg.out, "the Hugging Face export")
    if (cfg.vicrit_jsonl or cfg.vicrit_train_json) and cfg.objective != "revision":
        raise SystemExit("--vicrit-jsonl / --vicrit-train-json feed Stage I's hallucination term: use them with "
                         "--objective revision")
    if cfg.answer_len < 2:
        raise SystemExit(f"--answer-len {cfg.answer_len}: needs at least 2 (a caption token and the end of turn)")
    check_optimizer_flags(cfg)
    cfg.dcp = cfg.dcp or cfg.out.rstrip("/") + ".dcp"
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or this rank of a torchrun group (and its device)
    device = ctx.device
    micro = micro_batches(cfg.batch_size, ctx, cfg.grad_accum)  # refuses an uneven batch
    plan = check_memory(cfg, ctx)  # before any weight is loaded
    captions, pairs = load_data(cfg)
    model, tokenizer = load_llada_v(cfg.hf_model, device, MASTER_DTYPES[cfg.master_dtype])
    data = CaptionData(captions, pairs, model, tokenizer, cfg)
    cfg.steps = cfg.steps or math.ceil(len(captions) / cfg.batch_size)
    print(show_config(cfg))
    ordinary = ordinary_ids(model, tokenizer, "cpu")  # replacement tokens (drawn on the CPU)
    train_model, params, optimizer = prepare_training(model, ctx, cfg)
    start_step, history = 0, []
    if cfg.resume:
        meta = load_state(cfg, model, optimizer)
        check_resume(cfg, meta, ctx.world)
        start_step, history = meta["step"], meta["history"]
        print(f"resumed {cfg.dcp} at step {start_step}")
    autocast = autocast_for(cfg, ctx)

    def checkpoint(step):
        save_state(cfg, model, optimizer, {"stage": "finetune-" + cfg.objective, "step": step,
                                           "train_config": asdict(cfg), "history": history}, ctx)

    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=cfg.objective,
               dynamic_ncols=True)
    for step in bar:
        set_learning_rate(optimizer, step, cfg)
        batch = data.batch(step, cfg.batch_size)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        noisy = corrupt(batch, cfg, ordinary, generator)
        optimizer.zero_grad(set_to_none=True)

        def loss_of(rows):
            return training_loss(train_model, data, batch, noisy, rows, cfg, device)
        try:
            loss, parts = accumulate(train_model, ctx, micro, autocast, loss_of)
        except DataError as err:
            raise SystemExit(f"step {step}: {err}") from None
        batch_loss, parts = ctx.mean(loss), ctx.mean(parts)  # the whole batch's values, as one process has them
        if not torch.isfinite(batch_loss):
            raise SystemExit(f"step {step}: loss is {batch_loss.item()}; stopping. The last saved state is "
                             f"{cfg.dcp} (try a lower --lr)")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        history.append({"step": step + 1, "loss": batch_loss.item(), **{k: v.item() for k, v in parts.items()}})
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()})
        if cfg.save and ((step + 1) % cfg.save_every == 0 or step + 1 in (cfg.stop_at, cfg.steps)):
            checkpoint(step + 1)
        if step + 1 == cfg.stop_at:
            print(f"stopped at step {step + 1} (--stop-at); continue with --resume")
            return model
    if data.stats["captions_cut"] or data.stats["pairs_dropped_token_counts_differ"]:
        print(f"warning: {data.stats['captions_cut']} caption draws cut to --answer-len (no end of turn learnt for "
              f"them); {data.stats['pairs_dropped_token_counts_differ']} ViCrit pairs dropped (token counts differ)")
    report_peak_memory(plan, device)
    last = history[-1]["loss"] if history else float("nan")
    if not cfg.save:
        print(f"done: {cfg.steps} steps, last loss {last:.4f}; nothing written (--no-save)")
        return model
    export_hf(cfg.out, model, ctx, cfg, {"step": cfg.steps, "train_config": asdict(cfg), "history": history})
    print(f"done: {cfg.steps} steps, last loss {last:.4f}; "
          f"Hugging Face folder {cfg.out} (sample.py --ckpt {cfg.out} --image PHOTO), training state {cfg.dcp}")
    return model


if __name__ == "__main__":
    run_main(main)
