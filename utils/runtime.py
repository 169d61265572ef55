"""Device selection, seeding, logging, and the few distributed facts every script needs: one place each."""
from __future__ import annotations

import logging
import os
import random
import sys

import torch
import torch.distributed as dist

from .errors import SettingError

log = logging.getLogger("simplifying_transformers")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if not is_main_process() or int(os.environ.get("RANK", 0)) != 0:  # torchrun sets RANK before the group exists
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def select_device(name: str = "auto") -> torch.device:
    """auto -> cuda if available (the local rank's GPU under torchrun), else cpu."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise SettingError(f"`device` must be auto, cpu or cuda, got '{name}'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingError("`device` cuda was asked for, but torch sees no CUDA device; use `device` cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank()}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def device_problem(device: str | int) -> str | None:
    """Why this process cannot put weights on ``device`` (a name such as cuda:1 or cpu, or a GPU number as
    accelerate's device maps give it), or None: not a device name, a kind of device torch does not see, or an index
    beyond the devices of its kind."""
    if isinstance(device, int) and not isinstance(device, bool):  # a number: the GPU (accelerator) of that index
        accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        device = f"{accelerator.type if accelerator is not None else 'cuda'}:{device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return "not a device (cpu, cuda, cuda:N or a GPU number N)"
    if dev.type == "cpu":
        return None
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        return f"torch sees no {dev.type.upper()} device here" + (
            " (this torch is built without CUDA)" if dev.type == "cuda" and not torch.backends.cuda.is_built() else "")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        return f"there is no such device: torch sees {count} {dev.type.upper()} device(s), {dev.type}:0..{count - 1}"
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ---- distributed (torchrun) ----
def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). NCCL on GPUs, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or is_distributed():
        return is_distributed()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (exact counts, not averages of averages)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out

