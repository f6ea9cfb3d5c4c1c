"""Multi-process data-parallel training with the standard PyTorch engine (torchrun + DDP).

A trainer started by ``torchrun --nproc-per-node N`` (or ``srun`` + ``torchrun`` on a cluster) finds
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment;
:func:`process_group` joins that group (NCCL on CUDA, gloo on the CPU) and picks this process's
device (``cuda:LOCAL_RANK`` on GPUs). Without those variables, or with ``WORLD_SIZE=1``, every
function here is a cheap no-op: one process trains exactly as it always did.

Sampling: a rank draws its part of the global batch from its own deterministic random streams
(:func:`batch_streams`), so the global batch of a step depends only on (seed, step,
world size × gradient-accumulation steps), not on how the micro-batches are spread over processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from covidseg.devices import resolve_device
from covidseg.errors import UsageError

# How long a rank waits in a collective: rank 0 validates, plots and calibrates alone while the others
# wait for it (torch's NCCL default of 10 minutes is short for a big validation set).
TIMEOUT = datetime.timedelta(minutes=30)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset: a plain single-process run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` from the environment (0 when unset), readable before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    """True when this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of training processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that writes logs, plots, checkpoints and manifests (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def _device(spec: str, local_rank: int) -> torch.device:
    """This process's device under torchrun: ``cuda:LOCAL_RANK`` for auto/cuda, else the CPU."""
    spec = spec.strip().lower()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec not in ("auto", "cuda"):
        raise UsageError(
            None, f"--device {spec}: under torchrun use auto, cuda or cpu (rank -> cuda:LOCAL_RANK)"
        )
    if not torch.cuda.is_available():
        raise UsageError(None, "--device cuda: CUDA is not available on this machine")
    if local_rank >= torch.cuda.device_count():
        raise UsageError(None, f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device_spec: str = "auto") -> Iterator[torch.device]:
    """Join torchrun's process group when the environment describes one; yield this rank's device.

    NCCL when the device is CUDA, gloo on the CPU. The group is left on exit if this call created
    it (a caller that initialised its own group keeps it). Without torchrun's variables this is just
    :func:`covidseg.devices.resolve_device`.
    """
    if env_world_size() <= 1 and not is_distributed():
        yield resolve_device(device_spec)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_spec, local_rank)
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", init_method="env://", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", init_method="env://", timeout=TIMEOUT)
    try:
        yield device
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def seed_rank(seed: int) -> None:
    """Give each rank its own global torch RNG stream (dropout) after identical model init.

    A no-op in one process, so single-process runs draw exactly what they always drew.
    """
    if is_distributed():
        state = np.random.SeedSequence([int(seed), rank()]).generate_state(1, dtype=np.uint64)
        torch.manual_seed(int(state[0]) & (2**63 - 1))


def batch_streams(grad_accum: int) -> list[int]:
    """The random streams (see ``step_generator``) of this rank's micro-batches in one step.

    Rank r draws streams ``r·K … r·K + K − 1`` for ``K = grad_accum``; over all ranks that is
    ``0 … world·K − 1``, so the global batch depends only on ``world·K`` and stream 0 is what a
    single process without accumulation has always drawn.
    """
    return [rank() * grad_accum + m for m in range(grad_accum)]


def wrap(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(module)`` under a process group, else `module` itself.

    Gradients only synchronise through the wrapper's ``forward``: call the wrapper, not a method of
    the inner module, for every forward pass whose gradients must be averaged over ranks.
    """
    if not is_distributed():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (its state dict has no ``module.`` prefix)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def no_sync(*modules: nn.Module, skip: bool = True) -> Iterator[None]:
    """Skip DDP's gradient all-reduce in this backward when `skip` (accumulation micro-steps)."""
    with contextlib.ExitStack() as stack:
        if skip:
            for module in modules:
                if isinstance(module, DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        yield


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over ranks (for logging global-batch losses); identity in one process."""
    if not is_distributed() or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world_size()).tolist(), strict=True))


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (picklable objects: manifests, calibration dicts)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_in_sync(module: nn.Module, device: torch.device, rtol: float = 1e-5) -> None:
    """Raise on every rank if any rank's parameters differ from rank 0's (a forward that bypassed DDP).

    Compares per-parameter fingerprints (float64 sum and sum of squares), one all-gather of
    ``2 × n_parameters`` numbers. A no-op in one process.
    """
    if not is_distributed():
        return
    named = list(unwrap(module).named_parameters())
    mine = torch.stack(
        [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for _, p in named]
    ).to(device)  # [P, 2]
    gathered = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    every = torch.stack(gathered)  # [world, P, 2]
    close = torch.isclose(every, every[:1], rtol=rtol, atol=1e-6).all(dim=2)  # [world, P]
    if not bool(close.all()):  # every rank sees the same table and raises alike
        bad_ranks = [r for r in range(len(gathered)) if not bool(close[r].all())]
        names = [name for (name, _), ok in zip(named, close.all(dim=0).tolist(), strict=True) if not ok]
        raise RuntimeError(f"rank(s) {bad_ranks} parameters differ from rank 0's: {', '.join(names[:5])}")
