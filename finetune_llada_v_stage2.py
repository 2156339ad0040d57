"""finetune_llada_v_stage2.py: ReDiff Stage II, online self-correction (Section 3.3, Eq. 4 of arXiv 2510.19871), for
a Hugging Face LLaDA-V / ReDiff folder and real caption data, in one process or under torchrun (DDP / FSDP2).

Each of --rounds rounds:
  1. drafts     the current model captions the next --drafts-per-round images of --data-json (a fresh slice of a
                shuffled pass) with the refining sampler at --tokens-per-step 1 4 8 of --gen-length 128 (the paper's
                128 / 32 / 16 steps); images with the same speed and prompt length are drafted --draft-batch at a time;
  2. expert     --expert openai (o4-mini in the paper; any OpenAI-compatible endpoint, the key from OPENAI_API_KEY
                only, answers cached in --cache) sees the image, the reference caption and the draft and answers
                "right" or {org, target} pairs; --expert align needs no LLM (word alignment with the reference);
  3. alignment  the paper's rules: org occurs exactly once in the draft, target has org's token count
                (in_context here, then experts.validate_pairs); the target is the draft with the kept corrections
                applied, the mistake mask their positions (train_stage2.align);
  4. fine-tune  Eq. 4: the input is the model's own draft (no masking), the loss the cross-entropy on the mistake
                positions only; --stage1-mix of every batch is ordinary Stage I rows of --data-json
                (finetune_llada_v.training_loss);
then the round's statistics and the resumable training state (--dcp, DCP). At the end a Hugging Face folder (--out)
in LLaDA-V's layout, which llada_v.load_llada_v and sample.py --ckpt read.

    OPENAI_API_KEY=... python finetune_llada_v_stage2.py --hf-model out/rediff-s1 --data-json captions.json \\
        --image-root images --out out/rediff-s2
    torchrun --nproc_per_node 8 finetune_llada_v_stage2.py --parallel fsdp --activation-checkpointing \\
        --hf-model out/rediff-s1 --data-json captions.json --image-root images --out out/rediff-s2

Under torchrun, drafting chunk j goes to rank j mod N and the drafts are gathered; each rank asks the expert about
its own share of them (per-rank cache files, merged by rank 0); every rank then builds every global batch and runs
the model on its own rows (distributed.py). A rerun with --resume continues after the last finished round; answers
already in --cache are never requested again.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import distributed
import finetune_llada_v as ft
import rediff
import train_stage2
from cli import UsageError, check_folder_out, option, parse_config, run_main, show_config
from data.loaders import open_image
from experts import make_expert, merge_rank_caches, occurrences, rank_cache_path
from llada_v import CAPTION_QUESTION, generate_answer, load_llada_v, prompt_ids
from sample import check_hf_folder

DRAFT_STREAM = 2      # ft.take streams: 0 and 1 are the Stage I captions and ViCrit pairs (the mix), 2 the drafts,
PICK_STREAM = 1000    # and PICK_STREAM + round the order in which a round's corrected drafts are trained on


@dataclass
class Stage2Config(ft.FinetuneConfig):
    """finetune_llada_v.py's flags (data, Stage I settings of the mix, optimizer, parallelism, export), some with
    Stage II's meaning, then Stage II's own."""
    objective: str = option("revision", "objective of the --stage1-mix rows: revision (Stage I, Eq. 2-3) or mask "
                            "(Eq. 1)", choices=["revision", "mask"])
    hallucination_frac: float = option(0.25, "--stage1-mix with --vicrit-jsonl: share of the mix rows that are "
                                       "ViCrit pairs", at_least=0, at_most=1)
    answer_len: int = option(128, "--stage1-mix rows: answer tokens per row (caption, <|eot_id|>, <|endoftext|>)",
                             at_least=2)
    out: str = option("out/llada-v-stage2", "Hugging Face folder to write at the end (sample.py --ckpt reads it)")
    save_every: int = option(1, "rounds between training-state saves to --dcp (the last round is always saved)",
                             at_least=1)
    stop_at: int = option(0, "stop (with a --dcp save) after this round, as an interruption would; 0: all --rounds",
                          at_least=0)
    resume: bool = option(False, "continue the run saved at --dcp after its last finished round")
    steps: int = option(0, "optimizer steps per round; 0: one pass over the round's corrected drafts (the paper: one "
                        "epoch); the cosine schedule restarts every round", at_least=0)
    batch_size: int = option(32, "samples per step, all processes together: own drafts + --stage1-mix rows",
                             at_least=1)
    rounds: int = option(1, "rounds of draft -> expert -> fine-tune (the paper: one round gives most of the gain)",
                         at_least=1)
    drafts_per_round: int = option(10000, "drafts per round, each of a fresh --data-json image (the paper: about 10k)",
                                   at_least=1)
    tokens_per_step: list = option([1, 4, 8], "drafting speeds; the images of a round are spread over them",
                                   nargs="+", type=int, at_least=1)
    gen_length: int = option(128, "draft length in tokens, one block (the paper generates 128)",
                             at_least=1)
    draft_batch: int = option(16, "images drafted together (those with the same speed and prompt length)",
                              at_least=1)
    expert: str = option("openai", "who reviews the drafts: openai (an LLM) or align (word alignment with the "
                         "reference caption: no LLM, weak)", choices=["openai", "align"])
    expert_model: str = option("o4-mini", "--expert openai: the chat model")
    expert_base_url: str = option("", "--expert openai: an OpenAI-compatible endpoint (empty: api.openai.com); the "
                                  "key is read from OPENAI_API_KEY only")
    max_in_flight: int = option(8, "--expert openai: most requests at once (per process)",
                                at_least=1)
    cache: str = option("out/expert_cache_llada_v.jsonl", "--expert openai: append-only answer cache (empty: none)")
    stage1_mix: float = option(0.25, "fraction of every batch that is Stage I rows of --data-json (0 = none)")

# ----------------------------------------------------------------------------------------------------------------
# 1. Drafts


@torch.no_grad()
def make_drafts(model, tokenizer, data: ft.CaptionData, records: list, cfg: Stage2Config, ctx) -> list[dict]:
    """Caption `records` with the refining sampler (one block, greedy, as llada_v.caption), each with its own question
    (as finetune_llada_v.py trains on it); record k at tokens_per_step[k % n]. Rows of one speed and prompt length
    run together (placeholders line up), --draft-batch at a time; chunk j is rank j mod N's, and every rank gets
    every draft: those of one process."""
    speeds = [cfg.tokens_per_step[k % len(cfg.tokens_per_step)] for k in range(len(records))]
    prompts = [prompt_ids(tokenizer, model.n_image_tokens(data.image_size(r["image_path"])),
                          r.get("prompt") or CAPTION_QUESTION) for r in records]
    groups: dict[tuple, list] = {}
    for k in range(len(records)):
        groups.setdefault((speeds[k], len(prompts[k])), []).append(k)
    chunks = [rows[i:i + cfg.draft_batch] for _, rows in sorted(groups.items())
              for i in range(0, len(rows), cfg.draft_batch)]
    dtype = distributed.resolve_dtype(cfg.param_dtype, ctx.device)
    cast = torch.autocast(ctx.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    model.eval()
    ids = {}
    for j, chunk in enumerate(tqdm(chunks, desc="drafts", dynamic_ncols=True)):
        if j % ctx.world != ctx.rank:  # another rank's chunk
            continue
        views, sizes = ft.image_views(model, [records[k]["image_path"] for k in chunk])
        prompt = torch.tensor([prompts[k] for k in chunk], device=ctx.device)                  # (b, P)
        with cast:
            embeds = model.embed_views(views, sizes)                                            # (b, N, D)
            steps = math.ceil(cfg.gen_length / speeds[chunk[0]])
            out, _ = generate_answer(model, embeds, prompt, cfg.gen_length, steps)  # (b, G) official rules
        ids.update({k: row.tolist() for k, row in zip(chunk, out.cpu())})
    if ctx.world > 1:  # JSON keys come back as strings
        ids = {int(k): row for share in ctx.gather(ids) for k, row in share.items()}
    return [{"image_path": r["image_path"], "truth": r["caption"], "prompt": prompts[k], "tokens_per_step": speeds[k],
             "ids": torch.tensor(ids[k]), "text": answer_text(tokenizer, ids[k]), "scene": None, "image": None}
            for k, r in enumerate(records)]


def answer_text(tokenizer, ids: list[int]) -> str:
    """Answer ids -> the caption's text, cut at the first end of turn / end of text (as llada_v.caption)."""
    cut = min([ids.index(s) for s in tokenizer.stop_ids if s in ids] + [len(ids)])
    return tokenizer.decode(ids[:cut]).strip()

# ----------------------------------------------------------------------------------------------------------------
# 2. Expert review and 3. alignment


def expert_image(path: str):
    """What the expert is sent: a JPEG or PNG file's own bytes; any other format decoded (then sent as PNG)."""
    with open(path, "rb") as f:
        data = f.read()
    return data if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n" else open_image(path)


def review(expert, drafts: list[dict], ctx) -> tuple[list, Counter]:
    """train_stage2.review_drafts, with the images of this rank's share only read from disk (for an LLM expert)."""
    if expert.name == "openai":
        for k in ctx.part(len(drafts)):  # the share review_drafts gives this rank
            drafts[k]["image"] = expert_image(drafts[k]["image_path"])
    reviews, counts = train_stage2.review_drafts(expert, drafts, ctx)
    for draft in drafts:
        draft["image"] = None
    return reviews, counts


def in_context(review, draft: dict, tokenizer, counts: Counter):
    """The expert's rules that need the draft's text, before validate_pairs checks the rest on token ids:
    - org must occur exactly once in the draft's text (else counted as rejected_absent / rejected_repeated, dropped);
    - a byte-level BPE spells a word after a space (" red") differently from one at the start ("red"): when only the
      spaced spelling occurs in the draft's ids, org and target get the leading space the text had."""
    if not isinstance(review, list):
        return review
    ids, kept = draft["ids"].tolist(), []
    for pair in review:
        if isinstance(pair, dict) and isinstance(pair.get("org"), str) and isinstance(pair.get("target"), str) \
                and pair["org"].strip():
            org, target, n = pair["org"], pair["target"], draft["text"].count(pair["org"])
            if n != 1:
                counts["pairs_proposed"] += 1
                counts["rejected_" + ("absent" if n == 0 else "repeated")] += 1
                continue
            if (not org.startswith(" ") and not occurrences(ids, tokenizer.encode(org))
                    and occurrences(ids, tokenizer.encode(" " + org))):
                pair = {"org": " " + org, "target": target if target.startswith(" ") else " " + target}
        kept.append(pair)
    return kept

# ----------------------------------------------------------------------------------------------------------------
# 4. Fine-tuning with Eq. 4 (+ Stage I rows)


@dataclass
class Eq4Batch:
    """A global batch of corrected drafts at the level of their answers (G tokens each)."""
    samples: list               # B samples: image_path, prompt, ids (the draft), refined, mistake
    drafts: torch.Tensor        # (B, G) the model's own drafts: the input (no masking)
    refined: torch.Tensor       # (B, G) the same with the expert's corrections applied
    mistake: torch.Tensor       # (B, G) bool: the corrected segments (Eq. 4 scores these only)


def eq4_batch(samples: list[dict], picks: list[int]) -> Eq4Batch:
    """Samples `picks` as one global batch."""
    chosen = [samples[k] for k in picks]
    stack = lambda key: torch.stack([torch.as_tensor(s[key]) for s in chosen])  # noqa: E731  (B, G)
    return Eq4Batch(chosen, stack("ids"), stack("refined"), stack("mistake"))


def eq4_rows(batch: Eq4Batch, rows: slice, model) -> ft.Rows:
    """Rows `rows` as the model sees them: prompt, draft, <|endoftext|> up to these rows' longest;
    their images."""
    chosen = batch.samples[rows]
    ids, answer_at, start = ft.pack_rows([s["prompt"] for s in chosen], batch.drafts[rows])
    views, sizes = ft.image_views(model, [s["image_path"] for s in chosen])
    return ft.Rows(ids, answer_at, start, views, sizes)


def eq4_loss(model, batch: Eq4Batch, rows: slice, device, image_model=None):
    """Eq. 4 on rows `rows` of the global batch (a micro-batch of this process): a mean over drafts,
    each its own mean over its corrected positions (every draft here has a correction), so equal
    micro-batches average to the whole batch's loss. Logits at the draft's positions only
    (ft.answer_logits). image_model: the module whose image_views preprocesses (the model itself
    unless `model` is a DDP wrapper)."""
    part = eq4_rows(batch, rows, image_model or model).to(device)
    logits = ft.answer_logits(model, part)                                          # (b, G, V)
    refined, mistake = batch.refined[rows].to(device), batch.mistake[rows].to(device)   # (b, G)
    return rediff.refinement_loss(logits, refined, mistake)


def finetune_round(model, train_model, optimizer, params, samples, data, ordinary, cfg: Stage2Config, r: int,
                   first_step: int, ctx) -> list[dict]:
    """One round's optimizer steps; returns each step's whole-batch losses. Each process runs its
    rows of the own-draft part and of the Stage I part in --grad-accum micro-batches (one slice of
    each at a time)."""
    n_mix = round(cfg.batch_size * cfg.stage1_mix)
    n_own = cfg.batch_size - n_mix
    schedule = dataclasses.replace(cfg, steps=cfg.steps or math.ceil(len(samples) / n_own))  # restarts every round
    autocast, device, losses = ft.autocast_for(cfg, ctx), ctx.device, []
    own_micro = ft.micro_batches(n_own, ctx, cfg.grad_accum)
    mix_micro = ft.micro_batches(n_mix, ctx, cfg.grad_accum) if n_mix else [None] * cfg.grad_accum
    model.train()
    for i in tqdm(range(schedule.steps), desc=f"round {r + 1} fine-tune", dynamic_ncols=True):
        step = first_step + i
        ft.set_learning_rate(optimizer, i, schedule)
        picks = ft.take(list(range(len(samples))), cfg.seed, PICK_STREAM + r, i * n_own, n_own)  # passes over them
        batch = eq4_batch(samples, picks)
        if n_mix:
            mix = data.batch(step, n_mix)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            noisy = ft.corrupt(mix, cfg, ordinary, generator)

        def loss_of(rows):
            own_rows, mix_rows = rows
            own = eq4_loss(train_model, batch, own_rows, device, model)
            if not n_mix:
                return own, {"refine": own}
            stage1, _ = ft.training_loss(train_model, data, mix, noisy, mix_rows, cfg, device)
            # weighted by each part's share of the batch
            total = (n_own * own + n_mix * stage1) / cfg.batch_size
            return total, {"refine": own, "stage1": stage1}
        optimizer.zero_grad(set_to_none=True)
        micro = list(zip(own_micro, mix_micro))
        total, parts = ft.accumulate(train_model, ctx, micro, autocast, loss_of)
        # the whole batch's values
        parts = {k: v.item() for k, v in ctx.mean({**parts, "total": total}).items()}
        if not math.isfinite(parts["total"]):
            raise SystemExit(f"round {r + 1}, step {i}: loss is {parts['total']}; stopping. The last saved state is "
                             f"{cfg.dcp} (try a lower --lr)")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append({"step": step + 1, **parts})
    return losses


def drafting_replica(model, ctx, cfg):
    """The module that drafts. Without FSDP: the model itself (autocast casts on the fly). Under
    FSDP2: one replica in the compute dtype (bfloat16 on CUDA), built parameter by parameter from
    the gathered shards: the peak is that replica and one gathered tensor, never a whole float32
    state dict beside a float32 replica (about 67 GB for 8B). Every rank must call it (the gathers
    are collectives)."""
    if ctx.mode != "fsdp":
        return model
    dtype = distributed.resolve_dtype(cfg.param_dtype, ctx.device)
    # fully_shard subclasses the model: the replica is of the model's own class
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        replica = cls(model.cfg)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # one at a time
        owner, _, attr = name.rpartition(".")
        module = replica.get_submodule(owner)
        value = full.detach().to(ctx.device, dtype if full.is_floating_point() else full.dtype)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
        del full
    return replica.eval()

# ----------------------------------------------------------------------------------------------------------------
# Statistics, main


def report(r: int, cfg: Stage2Config, drafts, counts: Counter, samples, losses, expert_name: str) -> list[str]:
    """The round's statistics: drafts per speed, the expert's answers and pairs, training drafts, losses."""
    tag = f"round {r + 1}/{cfg.rounds}"
    speeds = ", ".join(f"{s} tok/step {sum(d['tokens_per_step'] == s for d in drafts)}"
                       for s in sorted(set(cfg.tokens_per_step)))
    words = sum(len(d["text"].split()) for d in drafts) / max(1, len(drafts))
    rejected = {k[len("rejected_"):]: v for k, v in sorted(counts.items()) if k.startswith("rejected_")}
    other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if not k.startswith(("rejected_", "pairs_"))
                      and k not in ("right", "no_answer", "no_valid_pair"))
    lines = [f"{tag} | drafts {len(drafts)} ({speeds}), {words:.1f} words on average",
             f"{tag} | expert {expert_name}: right {counts['right']}, no answer {counts['no_answer']}, pairs proposed "
             f"{counts['pairs_proposed']}, kept {counts['pairs_kept']}, rejected {sum(rejected.values())} "
             f"({', '.join(f'{k} {v}' for k, v in rejected.items()) or 'none'})" + (f" | {other}" if other else ""),
             f"{tag} | {len(samples)} drafts to train on ({counts['no_valid_pair']} left with no valid pair), "
             f"{sum(int(s['mistake'].sum()) for s in samples)} mistake tokens"]
    if samples:
        fixes = "; ".join(f"{p['org']!r} -> {p['target']!r}" for p in samples[0]["pairs"] if isinstance(p, dict))
        lines += [f"  example draft ({samples[0]['tokens_per_step']} tok/step): {samples[0]['text'][:300]}",
                  f"  its pairs (kept or not): {fixes[:300]}"]
    if losses:
        last = ", ".join(f"{k} {v:.4f}" for k, v in losses[-1].items() if k != "step")
        lines.append(f"{tag} | {len(losses)} steps, total loss {losses[0]['total']:.4f} -> {last}")
    return lines


def main(argv=None):
    cfg = parse_config(Stage2Config, argv, description=__doc__.split("\n\n")[0])
    ft.check_inputs(cfg, "finetune_llada_v_stage2.py")
    check_hf_folder(cfg.hf_model, "--hf-model")
    if not 0 <= cfg.stage1_mix < 1:
        raise UsageError(f"--stage1-mix must be in [0, 1), got {cfg.stage1_mix}")
    if cfg.vicrit_jsonl and (cfg.objective != "revision" or not cfg.stage1_mix):
        raise SystemExit("--vicrit-jsonl feeds the hallucination term of the Stage I rows: use it with --objective "
                         "revision and --stage1-mix > 0")
    check_folder_out(cfg.out, "the Hugging Face export")
    train_stage2.check_round_flags(cfg)
    cfg.dcp = cfg.dcp or cfg.out.rstrip("/") + ".dcp"
    ft.check_optimizer_flags(cfg)
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or this rank of a torchrun group (and its device)
    n_mix = round(cfg.batch_size * cfg.stage1_mix)
    ft.micro_batches(cfg.batch_size - n_mix, ctx, cfg.grad_accum)  # refuses an uneven split
    if n_mix:
        ft.micro_batches(n_mix, ctx, cfg.grad_accum)
    ft.check_memory(cfg, ctx)  # before any weight is loaded
    captions, pairs = ft.load_data(cfg)
    model, tokenizer = load_llada_v(cfg.hf_model, ctx.device, ft.MASTER_DTYPES[cfg.master_dtype])
    data = ft.CaptionData(captions, pairs, model, tokenizer, cfg)  # image sizes; the Stage I rows of the mix
    print(show_config(cfg))
    ordinary = ft.ordinary_ids(model, tokenizer, "cpu")
    train_model, params, optimizer = ft.prepare_training(model, ctx, cfg)
    first_round, step, history = 0, 0, []
    if cfg.resume:
        meta = ft.load_state(cfg, model, optimizer)
        if "round" not in meta:
            raise SystemExit(f"--resume: {cfg.dcp} holds a {meta.get('stage')!r} run, not Stage II; start Stage II "
                             f"from its Hugging Face export with --hf-model")
        ft.check_resume(cfg, meta, ctx.world)
        first_round, step, history = meta["round"], meta["step"], meta["history"]
        print(f"resumed {cfg.dcp} after round {first_round}")
    shared_cache = cfg.expert == "openai" and cfg.cache
    if shared_cache and ctx.is_main:
        merge_rank_caches(cfg.cache)  # answers that an interrupted multi-process run left in per-rank files
    ctx.barrier()
    expert = make_expert(cfg.expert, cfg.expert_model, cfg.expert_base_url or None, cfg.cache or None,
                         cfg.max_in_flight)
    if shared_cache and not ctx.is_main:  # every rank reads the shared cache; only rank 0 appends to it
        expert.cache.path = rank_cache_path(cfg.cache, ctx.rank)
    for r in range(first_round, cfg.rounds):
        records = ft.take(captions, cfg.seed, DRAFT_STREAM, r * cfg.drafts_per_round, cfg.drafts_per_round)
        drafts = make_drafts(drafting_replica(model, ctx, cfg), tokenizer, data, records, cfg, ctx)
        reviews, counts = review(expert, drafts, ctx)  # and this round's expert statistics
        if shared_cache and ctx.is_main:
            merge_rank_caches(cfg.cache)  # the other ranks' new answers (they have all answered: gathered)
        reviews = [in_context(rv, d, tokenizer, counts) for rv, d in zip(reviews, drafts)]
        samples = train_stage2.align(drafts, reviews, tokenizer, counts)
        losses = (finetune_round(model, train_model, optimizer, params, samples, data, ordinary, cfg, r, step, ctx)
                  if samples else [])
        step += len(losses)
        history.append({"round": r + 1, "step": step, "drafts": len(drafts), "samples": len(samples),
                        "mistake_tokens": sum(int(s["mistake"].sum()) for s in samples), "expert": dict(counts),
                        "losses": losses})
        for line in report(r, cfg, drafts, counts, samples, losses, expert.name):
            print(line)
        if not samples:
            print(f"round {r + 1}: no draft to train on (all right, or no valid pair): no fine-tuning")
        if (r + 1) % cfg.save_every == 0 or r + 1 in (cfg.stop_at, cfg.rounds):
            state = {"stage": "finetune-stage2", "round": r + 1, "step": step,
                     "train_config": asdict(cfg), "history": history}
            ft.save_state(cfg, model, optimizer, state, ctx)
        if r + 1 == cfg.stop_at:
            print(f"stopped after round {r + 1} (--stop-at); continue with --resume")
            return model
    ft.export_hf(cfg.out, model, ctx, cfg, {"stage": "finetune-stage2", "round": cfg.rounds, "step": step,
                                            "train_config": asdict(cfg), "history": history})
    print(f"done: {cfg.rounds} round(s), {step} steps; Hugging Face folder {cfg.out} (sample.py --ckpt {cfg.out} "
          f"--image PHOTO), training state {cfg.dcp}")
    return model


if __name__ == "__main__":
    run_main(main)
