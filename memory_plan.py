"""memory_plan.py: what one device holds while training a LLaDA-V / ReDiff folder, computed from
its config.json and the training flags before any weight is loaded, and the flags that make a plan
fit (train_stage1.py / train_stage2.py --init-from FOLDER print it and refuse a plan that does not
fit; tools/gpu_check.py --plan-only prints it anywhere). Pure arithmetic: no weights, no device.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from cli import UsageError
from llada_v import LLaDAV, anyres_layout, config_from_hf

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
        lines += [f"  {'total':<22} {self.total / GIB:8.2f} GiB of {self.device_bytes / GIB:.2f} "
                  f"GiB: {'fits' if self.fits else 'DOES NOT FIT'}",
                  f"  activations: {self.per_sample / GIB:.2f} GiB a sample x {self.micro_batch} a "
                  f"micro-batch; a sample is {self.seq_len} tokens"]
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


def memory_plan(config, flags, device_bytes: int, world: int = 1, device_type: str = "cuda",
                image_size: tuple[int, int] = (640, 480)) -> MemoryPlan:
    """The memory one device needs to train the model of `config` (llada_v.LLaDAVConfig) with
    `flags` (train_stage1.py's: optimizer, master_dtype, param_dtype, parallel,
    activation_checkpointing, batch_size, grad_accum, answer_len, vision_lr; train_stage2.py's
    add gen_length and the drafting replica) in `world` processes: weights, their compute copies,
    gradients, optimizer states, activations of a micro-batch of samples of image_size (llada_v's
    anyres rules), and a fixed overhead. Pure arithmetic; the per-token activation count is an
    estimate."""
    n_all, n_tower, n_root = parameter_counts(config)
    n_train = n_all - (0 if flags.vision_lr > 0 else n_tower)
    mode = flags.parallel if flags.parallel != "auto" else ("ddp" if world > 1 else "none")
    shard = world if mode == "fsdp" else 1
    master = 2 if flags.master_dtype == "bfloat16" else 4
    fp32 = flags.param_dtype == "float32" or (flags.param_dtype == "auto" and device_type != "cuda")
    compute = 4 if fp32 else 2
    lm, v, n_layers = config.lm, config.vision, config.lm.n_layers
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
    answer = max(getattr(flags, "answer_len", 0), getattr(flags, "gen_length", 0))
    if config.image_aspect_ratio == "pad":
        image_tokens, views = v.grid ** 2 + 1, 1
    else:
        layout = anyres_layout(image_size, config.grid_pinpoints, v.image_size, v.grid,
                               config.max_crops)
        image_tokens, views = layout.tokens, 1 + layout.rows * layout.cols
    seq = TEXT_TOKENS + image_tokens + answer
    d, f = STORED_PER_TOKEN
    block = (d * lm.d_model + f * lm.mlp_hidden) * compute          # bytes a token, one layer
    if flags.activation_checkpointing:  # block inputs, and one block while it is recomputed
        act = seq * n_layers * lm.d_model * compute + seq * block
    else:
        act = seq * n_layers * block
    act += answer * lm.vocab_size * (compute + 8)  # answer logits, float32 log-softmax, gradient
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
        notes.append(f"Stage II drafting adds a {replica / GIB:.1f} GiB replica (training "
                     f"activations are free then); counted where it is the larger peak")
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


def check_memory(cfg, ctx, device_type: str = "", refuse: bool = True) -> MemoryPlan:
    """Print the memory plan on ctx's device (or one of device_type) from --init-from's config.json
    and the flags; refuse one that does not fit, naming the flags that would make it fit
    (--ignore-memory-plan goes on regardless; refuse=False prints the refusal instead)."""
    path = os.path.join(cfg.init_from, "config.json")
    with open(path) as f:
        config = config_from_hf(json.load(f), path)
    if config.vision is None:
        raise SystemExit(f"--init-from {cfg.init_from} is a text-only LLaDA checkpoint: captioning "
                         f"needs LLaDA-V")
    width, _, height = cfg.plan_image.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) and int(height)):
        raise UsageError(f"--plan-image {cfg.plan_image!r}: give WIDTHxHEIGHT in pixels, e.g. "
                         f"640x480")
    image = (int(width), int(height))
    device_type = device_type or ctx.device.type
    args = (device_memory(ctx.device, cfg), ctx.world, device_type, image)
    plan = memory_plan(config, cfg, *args)
    print(plan.text())
    if plan.fits or cfg.ignore_memory_plan:
        return plan
    fix = fitting_flags(config, cfg, *args)
    advice = (f"add {' '.join(fix)}" if fix else "no flag of this script makes it fit on one "
              "device: use more GPUs (torchrun --nproc_per_node N ... --parallel fsdp)")
    refusal = (f"memory plan: {plan.total / GIB:.1f} GiB per device, but {device_type} has "
               f"{plan.device_bytes / GIB:.1f} GiB; {advice} (or --ignore-memory-plan to try "
               f"anyway)")
    if refuse:
        raise SystemExit(refusal)
    print(refusal)
    return plan
