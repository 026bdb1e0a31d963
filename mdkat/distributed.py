"""Data-parallel training under `torchrun`: the process group, the shards, and what crosses ranks.

`torchrun --nproc_per_node N stages/train.py ...` starts N copies of the stage with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `start` joins them into one process group (NCCL on GPUs, gloo
on the CPU). Without those variables everything here is the single-process identity, and the training loop
runs exactly as it always has.

What is shared, and how:
- every rank draws the same permutation of the training split each epoch and takes every `world`-th
  sample of each global batch (`shard`): disjoint shards, the global batch size preserved;
- gradients are averaged by DistributedDataParallel;
- state a model updates from its batch (KT's running errors, Self-MM's per-sample labels) is updated from
  the whole global batch on every rank (`gather_rows`), so it stays identical without any broadcast;
- in-batch contrastive negatives (KA) are gathered with their gradients (`gather_rows_with_grad`);
- validation batches are dealt round-robin and their predictions gathered back in order (`gather_objects`).

A rank that dies or hangs ends the others' collectives with an error after `MDKAT_DIST_TIMEOUT_S` seconds at
the latest (default 300); `torchrun` then stops the whole group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mdkat.errors import MdkatError

TIMEOUT_VARIABLE = "MDKAT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0  # long enough for a slow validation on one rank, short enough not to stall a queue
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """This process's place in the group: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and outputs, logs to MLflow and prints progress."""
        return self.rank == 0


def launched() -> bool:
    """True when torchrun (or a launcher like it) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise MdkatError(
            f"environment variable {TIMEOUT_VARIABLE}={raw!r}: expected a positive number of seconds"
        )
    return datetime.timedelta(seconds=seconds)


def start(device_choice: str) -> Context:
    """Join the process group torchrun describes (a no-op in a single process); idempotent."""
    if not launched():
        return Context()
    missing = [v for v in _LAUNCH_VARIABLES if v not in os.environ]
    if missing:
        raise MdkatError(f"WORLD_SIZE > 1 but {missing} not set: launch distributed training with torchrun")
    context = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        cuda = device_choice != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_timeout())
    return context


def stop() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Context:
    """The context of the process group joined by `start`, or the single-process one."""
    if not dist.is_initialized():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank died, hung or left."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out")
    )


def lost_contact_message(context: Context, error: BaseException) -> str:
    """What a rank says when the others stopped answering."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"rank {context.rank} of {context.world}: another rank stopped answering ({first}); it died or "
        f"hung (collectives wait {_timeout().total_seconds():g} s, {TIMEOUT_VARIABLE}): see that rank's "
        "output and torchrun's summary. The last epoch's checkpoint resumes with any number of ranks."
    )


def shard(index: Tensor, context: Context) -> Tensor:
    """This rank's samples of a global batch: every `world`-th, starting at its rank."""
    return index[context.rank :: context.world]


def _sizes(rows: int, device: torch.device) -> list[int]:
    size = torch.tensor([rows], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _all_gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """all_gather of row counts that differ by rank: padded to the longest, cut back after."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """(B_r, ...) on each rank -> ((sum B_r, ...) in rank order, offset of this rank's rows); no gradient."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    sizes = _sizes(x.shape[0], x.device)
    return _all_gather_rows(x, sizes), sum(sizes[: dist.get_rank()])


class _GatherRows(torch.autograd.Function):
    """all_gather forward; backward: this rank's rows of the gradient summed over every rank's loss."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:  # noqa: D102
        ctx.sizes = sizes
        return _all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss reads these rows
        start = sum(ctx.sizes[: dist.get_rank()])
        return grad[start : start + ctx.sizes[dist.get_rank()]], None


def gather_rows_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """(B_r, ...) -> ((sum B_r, ...), offset of this rank's rows); gradients flow back to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    sizes = _sizes(x.shape[0], x.device)
    return _GatherRows.apply(x, sizes), sum(sizes[: dist.get_rank()])


def sum_over_ranks(value: Tensor) -> Tensor:
    """The sum of `value` over all ranks (itself in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
