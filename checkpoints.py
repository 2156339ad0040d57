"""checkpoints.py: self-describing checkpoints of model.VLM: one safetensors file holding the
weights, the optimizer state and a JSON description (configs, tokenizer, stage, step), written
atomically; sharded DCP folders (written by distributed.py) are read here too, and load_for turns
every problem into one line that names the flag, the file and the fix."""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import VLM, VLMConfig

# One safetensors file; its metadata: configs, tokenizer, stage, step (JSON).

CKPT_FORMAT = "rediff-ckpt-v1"


def _atomic_write(path: str, write_fn) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: a kill at any moment
    leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".tmp-{os.path.basename(path)}-"
    for stale in os.listdir(folder):  # left by a writer killed mid-write; one writer per path
        if stale.startswith(prefix):
            os.remove(os.path.join(folder, stale))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".safetensors")
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _flatten_optimizer(optimizer) -> tuple[dict, dict]:
    """Optimizer state as flat tensors plus a JSON part (param groups and non-tensor state)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    """The optimizer's state_dict from _flatten_optimizer's two parts."""
    state: dict = {}
    for key, value in [*tensors.items(), *meta["plain"].items()]:  # "optim.3.exp_avg", "3.step"
        pid, name = key.removeprefix("optim.").split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str, model: VLM, meta: dict, optimizer=None):
    """Save weights, the optimizer if given, and `meta` (needs "tokenizer"; "stage", "step"...)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    description = {"format": CKPT_FORMAT, "model_config": asdict(model.cfg), **meta}
    if optimizer is not None:
        optim_tensors, description["optimizer"] = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
    metadata = {"rediff": json.dumps(description)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(tensors, description) of a checkpoint file; clear errors for a missing or foreign file."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a folder: none of the sharded DCP folders with "
                         f"a meta.json (distributed.py), nor a LLaDA-V folder (config.json)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: train one first "
                                f"(python train_stage1.py --tiny)")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("rediff")
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types for torn or foreign files
        raise ValueError(f"checkpoint {path!r} is not a readable safetensors file ({err}); "
                         f"re-save or re-train it") from err
    if raw is None:
        raise ValueError(f"checkpoint {path!r} has no 'rediff' metadata: not written by this "
                         f"project (for a LLaDA-V folder pass the folder, not a shard)")
    try:
        description = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {path!r}: 'rediff' metadata not valid JSON ({err})") from None
    if not isinstance(description, dict) or description.get("format") != CKPT_FORMAT:
        raise ValueError(f"checkpoint {path!r}: field 'format' is {description.get('format')!r}, "
                         f"expected {CKPT_FORMAT!r}")
    return tensors, description


# Sharded checkpoints: a DCP folder (written by distributed.save_dcp) is read here, so that every
# script loads both kinds through load_checkpoint.

DCP_FORMAT = "rediff-dcp-v1"
META_FILE = "meta.json"


def read_dcp_meta(path: str) -> dict:
    """meta.json of a DCP folder; clear errors for a missing, half-written or foreign folder."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isdir(path):
        hint = (f" (an interrupted save left {path}.old: rename it to {path})"
                if os.path.isdir(path + ".old") else "")
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist{hint}")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path!r} has no {META_FILE}: it is not a DCP checkpoint written by "
                         f"distributed.py")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != DCP_FORMAT:
        raise ValueError(f"{meta_path}: field 'format' {meta.get('format')!r}, not {DCP_FORMAT!r}")
    return meta


def load_dcp_state(path: str, state: dict) -> None:
    """Fill `state` in place from the folder's shards, resharded to how this run holds them."""
    import torch.distributed.checkpoint as dcp  # here: it loads slowly, only DCP folders need it
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled": one process, as meant
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(path),
                     no_dist=not dist.is_initialized())
    except Exception as err:  # DCP reports missing or mis-shaped tensors with its own exceptions
        raise ValueError(f"DCP checkpoint {path!r} does not fit this model or optimizer "
                         f"({str(err)[:500]})") from None


def load_dcp(path: str, device="cpu"):
    """load_checkpoint for a DCP folder: (model rebuilt from the saved config, meta)."""
    meta = read_dcp_meta(path)
    model = VLM(VLMConfig.from_dict(meta["model_config"]))
    load_dcp_state(path, {"model": model.state_dict()})  # in place, into the model's own tensors
    return model.to(device), meta


def load_checkpoint(path: str, device="cpu", optimizer=None) -> tuple[VLM, dict]:
    """Rebuild the model from the saved config (never from defaults), load its weights (and the
    optimizer's); a file or a DCP folder."""
    if os.path.isfile(os.path.join(path, META_FILE)):  # a sharded DCP folder
        if optimizer is not None:
            raise ValueError(f"{path!r} is a DCP folder: load its optimizer state with "
                             f"distributed.load_dcp_optimizer")
        return load_dcp(path, device)
    tensors, description = read_checkpoint(path)
    try:
        model = VLM(VLMConfig.from_dict(description["model_config"]))
    except (KeyError, TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"checkpoint {path!r}: field 'model_config' is missing or not understood "
                         f"({err!r}): another version of this code wrote it; re-train it") from None
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"checkpoint {path!r}: its weights do not fit its own model_config "
                         f"({err})") from None
    if optimizer is not None:
        if "optimizer" not in description:
            raise ValueError(f"checkpoint {path!r} holds no optimizer state, so it cannot be "
                             f"resumed; use --init-from")
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        try:
            optimizer.load_state_dict(_unflatten_optimizer(optim_tensors, description["optimizer"]))
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"checkpoint {path!r}: its optimizer state does not fit this run's "
                             f"trainable parameters ({err}); start a new run from its weights "
                             f"with --init-from") from None
    return model.to(device), description


def load_for(path: str, purpose: str, stages=None, needs=(), fix: str = "", device="cpu",
             optimizer=None):
    """load_checkpoint for a script's --init-from or --resume: every problem becomes a SystemExit
    that names `purpose`, the file, what it holds, what was expected and `fix`, never a
    state-dict traceback. stages: the accepted values of the checkpoint's "stage" (None: any);
    needs: metadata fields the caller reads."""
    fix = f". Fix: {fix}" if fix else ""
    try:
        model, meta = load_checkpoint(path, device, optimizer)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{purpose}: {err}{fix}") from None
    stage = meta.get("stage")
    if stages is not None and stage not in stages:
        raise SystemExit(f"{purpose}: {path} is a checkpoint of kind {stage!r} (step "
                         f"{meta.get('step')}), expected {' or '.join(map(repr, stages))}{fix}")
    missing = ", ".join(k for k in needs if k not in meta)
    if missing:
        raise SystemExit(f"{purpose}: {path} (kind {stage!r}) lacks the metadata field(s) "
                         f"{missing}, written by every training script of this project{fix}")
    return model, meta


def saved_run(path: str) -> tuple[dict | None, bool]:
    """(description, whether the run reached its --steps) of the checkpoint at `path` (a file or
    a DCP folder); (None, False) when there is none."""
    if not os.path.exists(path):
        return None, False
    try:
        meta = read_dcp_meta(path) if os.path.isdir(path) else read_checkpoint(path)[1]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{path}: {err}. Fix: move it away; --tiny writes there") from None
    return meta, meta.get("step", 0) >= meta.get("train_config", {}).get("steps", math.inf)
