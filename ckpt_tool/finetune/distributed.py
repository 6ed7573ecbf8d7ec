"""finetune-check on torch.distributed: the process group, DDP wrapping, and the cross-rank reductions.

Started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``) or by
``--nproc N``, which runs torchrun itself. One process is rank 0 of 1, and every reduction here is
then the identity, so the training loop has one code path.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from typing import Any

from ..errors import UsageError

TIMEOUT_S = 300  # a rank that fails alone leaves the others waiting in a collective: give up after this


class Ranks:
    """The processes a run trains on. ``owned`` says whether this run started the process group (and ends it)."""

    def __init__(
        self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str | None = None, owned: bool = False
    ) -> None:
        self.rank, self.world, self.local_rank, self.backend, self.owned = rank, world, local_rank, backend, owned

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def any(self, flag: bool, device: Any) -> bool:
        """True on every rank when ``flag`` is true on any."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, values: Iterable[float], device: Any) -> list[float]:
        values = list(values)
        if not self.distributed:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def max(self, value: float, device: Any) -> float:
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def differing(self, named: Iterable[tuple[str, Any]]) -> list[str]:
        """Names whose tensors are not bit-identical on every rank (compared by digest, not by sending them)."""
        named = list(named)
        if not self.distributed or not named:
            return []
        import torch.distributed as dist

        digests = [_digest(t) for _, t in named]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, digests)
        return [name for i, (name, _) in enumerate(named) if any(g[i] != digests[i] for g in gathered)]

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _digest(tensor: Any) -> str:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def from_environment(device: str) -> Ranks:
    """The process group torchrun describes in the environment; one process when it describes none.

    gloo on the CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    import datetime

    import torch
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owned=False)
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return Ranks(rank, world, local, backend, owned=True)


def device_for(ranks: Ranks, device: Any) -> Any:
    """Each rank's own GPU under nccl; the CPU (or the one device asked for) otherwise."""
    import torch

    if ranks.distributed and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


def wrap(model: Any, ranks: Ranks, device: Any) -> Any:
    """``model`` in DistributedDataParallel (for the parameters trainable now), or itself on one process."""
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not any(p.requires_grad for p in model.parameters()):
        return model  # DDP refuses a model with nothing to reduce; the checks report it
    # unused trainable parameters are a finding the gradients check reports, not a crash of the reducer
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """The command ``--nproc N`` runs: torchrun (as ``python -m torch.distributed.run``) on one machine."""
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ckpt_tool",
        *argv,
    ]
