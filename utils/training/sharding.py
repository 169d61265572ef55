"""FSDP2 for the training loop: whole models sharded over the processes of torchrun, their resume points sharded too.

With ``TrainConfig.fsdp`` the loop shards every decoder / encoder layer and then the root of each trained model (a
unit that is a whole model) and of the frozen teacher with ``torch.distributed.fsdp.fully_shard``, so that each of N
processes holds 1/N of the parameters, gradients and AdamW state (and of the teacher). Under torchrun the gradients are
reduce-scattered instead of all-reduced (DistributedDataParallel is not used); a forward of a sharded model is a
collective, so every rank runs the same number of them (the evaluation sampler deals every rank a share of every
batch).

Resume points are written with ``torch.distributed.checkpoint`` (DCP): every process writes its own shards into the
folder ``shards/`` of the resume point (model and optimizer, keyed by parameter name), which loads on any number of
processes, one without a process group included. The exported ``last`` / ``best`` checkpoints stay the consolidated
safetensors model: the full state dict is gathered to rank 0, which writes it.

``dtype`` bf16 (GPU only): parameters are cast to bf16 for the forward and backward, gradients reduced in fp32, the
master weights and AdamW state stay fp32 (``MixedPrecisionPolicy``). ``activation_checkpointing`` (with or without
FSDP): each layer of a trained model keeps only its input and recomputes the rest in the backward pass.

Only whole models are sharded: the block and pair units of retrain_single_block / retrain_merge are small (one layer),
so those jobs have no ``--fsdp``.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import runtime
from ..errors import SettingError
from ..storage.checkpoint import CheckpointError

log = logging.getLogger(__name__)

SHARDS = "shards"  # the folder of a resume point that holds the DCP shards
DTYPES = ("fp32", "bf16")


def check_settings(cfg: Any, device: torch.device) -> None:
    """Refuse settings that do not go together: bf16 without FSDP or off a GPU, an unknown dtype."""
    if cfg.dtype not in DTYPES:
        raise SettingError(f"`dtype` must be one of {', '.join(DTYPES)}, got '{cfg.dtype}'")
    if cfg.dtype == "bf16" and not cfg.fsdp:
        raise SettingError("`dtype` bf16 is the mixed precision of `fsdp`; without it a GPU run uses bf16 autocast "
                           "already")
    if cfg.dtype == "bf16" and device.type != "cuda":
        raise SettingError(f"`dtype` bf16 needs a GPU (this run is on {device.type}); on CPU, FSDP trains in fp32: "
                           "leave `dtype` out")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def prepare(task: nn.Module, units: list, cfg: Any, *, device: torch.device) -> None:
    """Activation checkpointing of the trained models' layers, then (FSDP under torchrun) the sharding of the trained
    models and the teacher, in place. Run before the optimizers are made: sharding replaces the parameters."""
    check_settings(cfg, device)
    if not (cfg.fsdp or cfg.activation_checkpointing):
        return
    bad = [u.name for u in units if not isinstance(getattr(u.module, "layers", None), nn.ModuleList)]
    if bad:
        raise SettingError(f"`fsdp` / `activation_checkpointing` train whole models layer by layer; units {bad} are "
                           "not whole models (block and pair jobs are small: train them without these settings)")
    if cfg.activation_checkpointing:
        for u in units:
            for layer in u.module.layers:
                layer.forward = _checkpointed(layer.forward)
    if cfg.fsdp and runtime.is_distributed():
        _shard(task, [u.module for u in units], dtype=cfg.dtype)


def _checkpointed(forward: Callable) -> Callable:
    """``forward`` that, while gradients are recorded, keeps only its inputs and recomputes the rest in the backward
    (torch.utils.checkpoint, non-reentrant: keyword arguments and the RNG state of dropout are kept)."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _shard(task: nn.Module, students: list[nn.Module], *, dtype: str) -> None:
    """``fully_shard`` per layer, then on each root: the trained models, the frozen teacher, and the task itself
    where it has parameters of its own."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16"
          else MixedPrecisionPolicy())
    teacher = getattr(task, "teacher", None)
    models = students + ([teacher] if isinstance(getattr(teacher, "layers", None), nn.ModuleList) else [])
    if teacher is not None and len({p.device for p in teacher.parameters()}) > 1:
        raise SettingError("`fsdp` shards the teacher itself: leave `teacher_device_map` out")
    for model in models:
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    inside = {id(p) for m in students for p in m.parameters()}
    if any(id(p) not in inside for p in task.parameters()):
        fully_shard(task, mp_policy=mp)
    log.info("fsdp: %d model(s) sharded over %d processes, layer by layer%s", len(models), runtime.world_size(),
             " (bf16 compute, fp32 master weights)" if dtype == "bf16" else "")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (a DTensor's local shard; a plain tensor itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds of ``module``'s parameters and of ``optimizer``'s state (AdamW: two moments)."""
    params = sum(local(p).numel() * local(p).element_size() for p in module.parameters())
    state = sum(local(v).numel() * local(v).element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.ndim > 0)
    return {"parameters": params, "optimizer": state}


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite on every rank (sharded: each rank checks its shard, and all
    agree on the answer, so that all stop or none)."""
    ok = all(bool(torch.isfinite(local(p)).all()) for p in module.parameters())
    if runtime.is_distributed() and is_sharded(module):
        flag = torch.tensor([float(not ok)], device=next(iter(module.parameters())).device)
        ok = runtime.all_reduce_sum(flag).item() == 0
    return ok


def remove_stale_shards(out_dir: Path, name: str) -> None:
    """Remove the ``<name>.shards.*`` folders in ``out_dir`` that no resume point took in (a job that died while its
    ranks wrote them)."""
    import shutil

    for left in out_dir.glob(f"{name}.shards.*"):
        shutil.rmtree(left, ignore_errors=True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, as without FSDP: gathered to rank 0 on the CPU (a collective: every rank calls
    it; the others get an empty dict)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _dcp_quietly(fn: Callable, state: dict[str, Any], folder: Path) -> None:
    """A DCP save / load; without a process group it runs as a single process (no warning about it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        fn(state, checkpoint_id=str(folder), no_dist=not runtime.is_distributed())


def write_shards(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, *, stamp: str) -> str:
    """Every process writes its shards of ``module`` and ``optimizer`` into ``folder`` (a collective); returns the
    sha256 of the stamp and the shard layout (DCP's ``.metadata``), which the training state keeps to recognise
    them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    _dcp_quietly(dcp.save, {"model": msd, "optimizer": osd, "stamp": stamp}, folder)
    runtime.barrier()  # every shard is on disk before rank 0 moves the folder into the resume point
    return _shards_hash(folder, stamp) if runtime.is_main_process() else ""  # rank 0 alone reads it (and moves it)


def _shards_hash(folder: Path, stamp: str) -> str:
    try:
        layout = (folder / ".metadata").read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"'{folder}' has no .metadata: not a complete sharded resume point") from None
    return hashlib.sha256(stamp.encode() + layout).hexdigest()


def read_shards(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, *, expected: str) -> None:
    """Load the shards in ``folder`` into ``module`` and ``optimizer`` (sharded or not, on any number of processes);
    CheckpointError where they are not the ones the training state was saved with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    _shards_hash(folder, "")  # no layout: not a sharded resume point (before DCP, whose own errors are tracebacks)
    msd, osd = get_state_dict(module, optimizer)
    state = {"model": msd, "optimizer": osd, "stamp": ""}
    try:
        _dcp_quietly(dcp.load, state, folder)
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError, CheckpointException) as e:  # damaged shards
        raise CheckpointError(f"'{folder}' cannot be read as the sharded resume point of this model: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if _shards_hash(folder, state["stamp"]) != expected:
        raise CheckpointError(f"'{folder}': the shards are not the ones its train_state.pt was saved with")
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
