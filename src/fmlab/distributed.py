"""Processes and CPUs: rank, world size and a gather that is exact under DDP, Lightning Fabric for the evaluation
entry point, the CPUs a process may use, and the signals a process answers.

Evaluation spreads fixed chunks of work over the ranks and gathers the results in chunk order, so every metric
is the same number whatever the number of processes (see `gather_chunks`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# torch is imported where it is used: the entry points import this module for its signals and CPUs before their
# config checks, so a bad command ends without paying for torch's import (about 1.3 s of CPU)


@dataclass
class Ranks:
    """rank / world size and the strategy's `all_gather` (tensor → (world_size, *tensor.shape))."""

    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def of_trainer(cls, trainer: Any) -> Ranks:
        return cls(trainer.global_rank, trainer.world_size, trainer.strategy.all_gather)

    @classmethod
    def of_fabric(cls, fabric: Any) -> Ranks:
        return cls(fabric.global_rank, fabric.world_size, fabric.all_gather)

    def chunks(self, num_chunks: int) -> range:
        """The chunk indices this rank works on: rank, rank + world, ..."""
        return range(self.rank, num_chunks, self.world_size)

    def gather(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1 or self.all_gather is None:
            return tensor.unsqueeze(0)
        return self.all_gather(tensor)

    def all_true(self, flag: bool, device: torch.device | None = None) -> bool:
        """Whether `flag` holds on every rank: a collective under DDP (every rank calls it and gets the same
        answer), so a branch on it is taken by all ranks or by none."""
        import torch

        return bool(self.gather(torch.tensor([float(flag)], device=device)).min() > 0)


# what torch's collectives say when a peer process is gone (gloo's TCP pair, NCCL's watchdog, the TCP store)
LOST_PEER_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
                      "Broken pipe", "NCCL communicator was aborted", "failed to recv, got 0 bytes")  # fmt: skip


def lost_rank_message(error: BaseException, rank: int, world_size: int) -> str | None:
    """One line for a collective that failed because another rank's process ended (SIGKILL, out of memory, a lost
    node), naming the lost rank where it is the only other one; None for any other error."""
    matched = [message for message in LOST_PEER_MESSAGES if message in str(error)]
    if world_size < 2 or not matched:
        return None
    lost = f"rank {1 - rank}" if world_size == 2 else f"a rank other than {rank} (of {world_size})"
    return f"{lost} of this {world_size}-process run ended ({matched[0].lower()}); rank {rank} stops too"


def end_process_group() -> None:
    """Wait for every rank, then destroy the process group, before the entry point returns. Left to exit-time
    clean-up, a rank that leaves while its peer still writes metrics.json can abort that peer after the file is
    written ("terminate called without an active exception", status 134): 1 two-process evaluation in 6 here."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def chunk_sizes(total: int, chunk_size: int) -> list[int]:
    """Sizes of the fixed chunks `total` items are cut into: [chunk_size, ..., remainder]."""
    if total < 1 or chunk_size < 1:
        raise ValueError(f"total={total} and chunk_size={chunk_size} must be positive")
    return [min(chunk_size, total - start) for start in range(0, total, chunk_size)]


def gather_chunks(results: dict[int, Tensor], sizes: list[int], ranks: Ranks, like: Tensor) -> Tensor:
    """Concatenate per-chunk results, computed by whichever rank owns each chunk, in chunk order on every rank.

    Each rank holds the chunks `ranks.chunks(len(sizes))` in `results` (chunk index → tensor of `sizes[i]` rows shaped
    like `like[0]`); they are padded into slots, all-gathered once, and unpadded, so the output equals a one-process
    run that computed every chunk itself.
    """
    import torch

    num_chunks, world = len(sizes), ranks.world_size
    slots = -(-num_chunks // world)
    padded = torch.zeros(slots, max(sizes), *like.shape[1:], dtype=like.dtype, device=like.device)
    for chunk, value in results.items():
        padded[chunk // world, : sizes[chunk]] = value
    gathered = ranks.gather(padded)  # (world, slots, max size, ...)
    return torch.cat([gathered[c % world, c // world, : sizes[c]] for c in range(num_chunks)])


def own_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity set where the OS has one (a scheduler, `taskset` or
    `fmlab.table workers=N` narrows it to the process's share), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def make_fabric(trainer_cfg: Any) -> Any:
    """Lightning Fabric for the processes a `trainer` config names (accelerator, devices, strategy, nodes)."""
    import lightning as L

    return L.Fabric(
        accelerator=trainer_cfg.get("accelerator", "cpu"),
        devices=trainer_cfg.get("devices", 1),
        strategy=trainer_cfg.get("strategy") or "auto",
        num_nodes=trainer_cfg.get("num_nodes", 1),
    )


SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
INTERRUPTS = (signal.SIGTERM, signal.SIGINT)  # a scheduler's preemption, Ctrl-C: fmlab treats them alike


@contextmanager
def on_signals(handler: Callable[[int, Any], None], signums: tuple[int, ...] = INTERRUPTS) -> Iterator[None]:
    """Within the block `handler` answers `signums`; the handlers before are put back after it."""
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
