"""distributed.py: multi-process training on PyTorch's own engine: torchrun start-up, DDP or FSDP2
(bf16 mixed precision, activation checkpointing), each rank's rows of the global batch,
collectives, and sharded checkpoints through torch.distributed.checkpoint (DCP). Every helper also
works in one process, without torchrun.

    torchrun --nproc_per_node 8 train_stage1.py --parallel fsdp --out out/stage1.dcp ...
    python distributed.py --dcp out/stage1.dcp --out out/stage1.safetensors  # one file, to share

The rules the training scripts follow (docs/parallel.md):
- --batch-size is the GLOBAL batch: every rank builds all of it from (seed, step), draws all its
  masks and corruptions (one process's random draws), and runs the model on its own rows only.
- The MEAN over ranks of each rank's loss is the whole batch's one-process loss: Eq. 1-4's
  per-sample means over equal shards as they are; a loss over a token count pooled over the
  batch (shapes_aids.py's word-class loss) divides by the whole batch's count / world
  (Context.count). DDP and FSDP average gradients over ranks: each step's gradient is the
  one-process one, up to the order of float summation.
- NAME.safetensors is one checkpoint file (checkpoints.save_checkpoint); NAME.dcp a DCP folder: one
  safetensors shard per writing rank plus meta.json, readable by any number of processes;
  checkpoints.load_checkpoint reads both.
- DDP's, FSDP's and DCP's own modules are imported inside the functions that use them: a run in
  one process never loads them.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from checkpoints import (DCP_FORMAT, META_FILE, load_dcp, load_dcp_state, read_dcp_meta,
                         save_checkpoint)
from cli import UsageError, check_writable, option, parse_config, run_main
from model import pick_device

MODES = ["auto", "none", "ddp", "fsdp"]


@dataclass
class Context:
    """This process's place in the run: parallel mode, rank, process count (world), device."""
    mode: str = "none"                      # none, ddp or fsdp
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, size: int) -> slice:
        """This rank's equal share of a global batch of `size` rows (all of it in one process)."""
        if size % self.world:
            raise SystemExit(f"a global batch of {size} rows does not split evenly over "
                             f"{self.world} processes: choose --batch-size (Stage II: its "
                             f"own-draft and --stage1-mix parts too) as multiples of {self.world}")
        n = size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def part(self, n: int) -> range:
        """This rank's contiguous share of n items, for work that may split unevenly (reviews)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def count(self, chosen: torch.Tensor) -> torch.Tensor:
        """Denominator of a loss normalised by a token count: the whole batch's count (at least 1;
        `chosen`: the global mask) / world: mean over ranks of (rank's sum / this) = sum / count."""
        return chosen.sum().clamp(min=1) / self.world

    def mean(self, values):
        """The mean over ranks of a tensor or a dict of scalars (detached; as is in one process)."""
        if self.world == 1:
            return values
        if isinstance(values, dict):
            stacked = torch.stack([torch.as_tensor(v).detach().float() for v in values.values()])
            return dict(zip(values, self.mean(stacked)))
        total = values.detach().float().to(self.device).clone()
        dist.all_reduce(total)
        return total / self.world

    def gather(self, obj) -> list:
        """Every rank's JSON-able `obj`, in rank order, as UTF-8 bytes in tensors (no pickle)."""
        if self.world == 1:
            return [obj]
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        size = torch.tensor([len(data)], device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        padded = torch.zeros(int(max(sizes)), dtype=torch.uint8, device=self.device)
        padded[:len(data)] = data
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return [json.loads(o[:int(s)].cpu().numpy().tobytes()) for o, s in zip(out, sizes)]

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def setup(mode: str = "auto", device: str = "auto") -> Context:
    """Join the process group (once per process), pick this rank's device. auto: ddp under
    torchrun, else none. ddp / fsdp without torchrun: a group of one process (for debugging)."""
    if mode not in MODES:
        raise SystemExit(f"--parallel {mode!r}: choose one of {', '.join(MODES)}")
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun's variables
    if mode == "auto":
        mode = "ddp" if torchrun else "none"
    if mode == "none":
        if torchrun and int(os.environ["WORLD_SIZE"]) > 1:
            raise SystemExit("--parallel none under torchrun with several processes: each would "
                             "train its own copy on the whole batch; use --parallel ddp or fsdp")
        return Context("none", device=pick_device(device))
    where = pick_device(device)
    if where.type == "mps":
        raise SystemExit(f"--parallel {mode}: torch.distributed has no MPS backend; use --device "
                         f"cpu or cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if where.type == "cuda":
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        backend = "nccl" if where.type == "cuda" else "gloo"
        if torchrun:
            dist.init_process_group(backend)  # rendezvous through torchrun's environment variables
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(dist.destroy_process_group)
    ctx = Context(mode, dist.get_rank(), dist.get_world_size(), where)
    if not ctx.is_main:
        quiet()
    return ctx


def quiet() -> None:
    """Ranks other than 0 print nothing (stdout to /dev/null, no tqdm bars); errors reach stderr."""
    if getattr(sys.stdout, "name", "") != os.devnull:  # once per process
        sys.stdout = open(os.devnull, "w")
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)

# --------------------------------------------------------------------------------------------------
# Wrapping the model


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--param-dtype: auto is bfloat16 on CUDA (the paper's training precision), else float32 (CPU
    bf16 is slow, and exact comparisons with a single-process run need float32)."""
    auto = "bfloat16" if device.type == "cuda" else "float32"
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[auto if name == "auto" else name]


def checkpoint_blocks(blocks) -> None:
    """Activation checkpointing: each block keeps only its input in the forward pass and recomputes
    its inner activations in the backward (one more forward of compute; a block's activation memory
    falls from tens of (B, L, D) tensors to one). Parameter names are unchanged."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def wrap(model: nn.Module, ctx: Context, param_dtype: str = "auto",
         activation_checkpointing: bool = False):
    """The module that training steps call: the model itself (none), DDP(model), or the model
    sharded in place by FSDP2 (each transformer block and the vision tower a unit, the rest root).
    Call it after freezing parameters and before building the optimizer (FSDP2 replaces the
    parameters with DTensor shards). Under FSDP sample from full_copy(). For model.VLM and
    llada_v.LLaDAV (both: .vision_tower and .lm.layers)."""
    blocks = list(model.lm.layers)
    if activation_checkpointing:
        checkpoint_blocks(blocks)
    if ctx.mode == "none":
        return model
    if ctx.mode == "ddp":  # buffers are constants (positions): never synchronised
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    for tensor in list(model.parameters()) + list(model.buffers()):  # rank 0's weights for all,
        dist.broadcast(tensor.data, src=0)      # as DDP does (vision pretraining may differ on GPU)
    dtype = resolve_dtype(param_dtype, ctx.device)
    # Parameters all-gathered in `dtype` for compute; gradients reduce-scattered; sharded master
    # weights and Adam states in float32; block inputs as they are (float32 RoPE); float32 logits.
    policy = functools.partial(MixedPrecisionPolicy, dtype, torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy(cast_forward_inputs=False))
    if hasattr(model, "vision_tower"):
        fully_shard(model.vision_tower, mp_policy=policy())
    fully_shard(model, mp_policy=policy(output_dtype=torch.float32))
    return model


def full_copy(model: nn.Module, ctx: Context) -> nn.Module:
    """A plain module holding every weight, to sample and evaluate: the model itself, unless FSDP
    shards it; then a new replica of the all-gathered float32 weights (every rank calls this)."""
    if ctx.mode != "fsdp":
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    # fully_shard subclasses the model: the replica is of the first class that is not FSDP's
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device(ctx.device):
        copy = cls(model.cfg)
    copy.load_state_dict(state)
    return copy

# --------------------------------------------------------------------------------------------------
# Checkpoints


def is_dcp(path: str) -> bool:
    """Checkpoint kind by name: .safetensors is one file; anything else a DCP folder."""
    return not path.endswith(".safetensors")


def save_file(path: str, model: nn.Module, meta: dict, ctx: Context) -> None:
    """checkpoints.save_checkpoint (weights only) in any parallel mode: rank 0 writes the whole
    model."""
    whole = full_copy(model, ctx)
    if ctx.is_main:
        save_checkpoint(path, whole, meta)
    ctx.barrier()


def save_dcp(path: str, model: nn.Module, optimizer, meta: dict, ctx: Context) -> None:
    """A DCP folder: every rank writes its shard of the model and optimizer state as safetensors
    (loading never unpickles), rank 0 adds meta.json (configs, step, history, the optimizer's
    hyper-parameters); written to PATH.tmp and swapped in. `model`: plain or FSDP, not DDP's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path = path.rstrip("/")
    tmp = path + ".tmp"
    model_state, optim_state = get_state_dict(model, optimizer)  # unprefixed; FSDP: DTensors
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    ctx.barrier()
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_state, "optim": optim_state["state"]},
                 no_dist=not dist.is_initialized(),
                 storage_writer=dcp.HuggingFaceStorageWriter(tmp, save_distributed=True))
    if ctx.is_main:
        description = {"format": DCP_FORMAT, "model_config": asdict(model.cfg),
                       "written_by_processes": ctx.world, **meta,
                       "optimizer_param_groups": optim_state["param_groups"]}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(description, f)
            f.flush()
            os.fsync(f.fileno())
        swap_in_folder(tmp, path)
    ctx.barrier()


def swap_in_folder(tmp: str, path: str) -> None:
    """Replace the folder `path` by the finished `tmp`: the old one moved aside first and removed
    last, an interruption leaves one whole folder (path, or path.old between the renames)."""
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_dcp_weights(path: str, model: nn.Module) -> dict:
    """Load a DCP folder's weights into `model` as it is (plain or sharded by wrap(); any class,
    e.g. llada_v.LLaDAV), resharded to this run's processes; returns the folder's meta.json."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    meta = read_dcp_meta(path)
    state = {"model": get_model_state_dict(model)}
    load_dcp_state(path, state)
    set_model_state_dict(model, state["model"])
    return meta


def load_dcp_optimizer(path: str, model: nn.Module, optimizer) -> None:
    """Load a DCP folder's optimizer state into `optimizer` (built over `model` after wrap())."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict
    groups = read_dcp_meta(path)["optimizer_param_groups"]
    state = {"optim": get_state_dict(model, optimizer)[1]["state"]}  # tensors to load into, by name
    load_dcp_state(path, state)
    set_optimizer_state_dict(model, optimizer, {"state": state["optim"], "param_groups": groups})

# --------------------------------------------------------------------------------------------------
# Command line: a DCP folder -> one .safetensors file


@dataclass
class ConsolidateConfig:
    dcp: str = option("", "a DCP checkpoint folder (train_stage1.py --out NAME.dcp)")
    out: str = option("", "the one-file checkpoint to write (weights and description, no "
                      "optimizer state); sample.py, tools/eval.py and --init-from also read the "
                      "folder itself")


def main(argv=None):
    cfg = parse_config(ConsolidateConfig, argv, description=__doc__.split("\n\n")[0])
    if not cfg.dcp or not cfg.out.endswith(".safetensors"):
        raise UsageError("give --dcp FOLDER and --out FILE.safetensors")
    check_writable(cfg.out, "--out")
    try:
        model, meta = load_dcp(cfg.dcp)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--dcp: {err}. Fix: give a folder written by train_stage1.py --out "
                         f"NAME.dcp") from None
    skip = ("format", "model_config", "optimizer_param_groups", "written_by_processes")
    save_checkpoint(cfg.out, model, {k: v for k, v in meta.items() if k not in skip})
    print(f"{cfg.dcp} (stage {meta.get('stage')}, step {meta.get('step')}) -> {cfg.out}")


if __name__ == "__main__":
    run_main(main)
