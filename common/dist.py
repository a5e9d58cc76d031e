r"""Multi-process runs with torchrun: one process per device (NCCL on CUDA, gloo on CPU); a single process (no
torchrun) stays the default and never touches torch.distributed.

    torchrun --standalone --nproc_per_node 2 train.py ...      # or test.py

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Results are made independent of the
number of processes by the callers: episode lists are split by rank, per-class intersection/union sums (int64) are
all-reduced, and only rank 0 writes files.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from common.errors import UserError


@dataclass(frozen=True)
class Dist:
    r"""This process's place in the run: rank, world size, local rank (device index on its node)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = 'sum') -> torch.Tensor:
        r"""In place, across processes (identity in a single process). op: 'sum' | 'min' | 'max'."""
        if self.enabled:
            tdist.all_reduce(tensor, op={'sum': tdist.ReduceOp.SUM, 'min': tdist.ReduceOp.MIN,
                                         'max': tdist.ReduceOp.MAX}[op])
        return tensor

    def all_gather_object(self, obj) -> list:
        r"""[obj of rank 0, obj of rank 1, ...] (picklable Python objects; [obj] in a single process)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        r"""Rank 0's `obj` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def shard(self, items: list) -> list:
        r"""This rank's share of a fixed list: items[rank::world] (every item exactly once over the ranks)."""
        return list(items)[self.rank::self.world]


SINGLE = Dist()


def init_distributed(device_name: str) -> tuple[Dist, str]:
    r"""Join the process group torchrun set up (if any). Returns (Dist, the device name this process uses):
    under torchrun with CUDA each process takes `cuda:LOCAL_RANK`; `--device cuda:N` cannot be combined with it."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return SINGLE, device_name
    rank, local = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    use_cuda = device_name in ('auto', 'cuda') and torch.cuda.is_available()
    if device_name.startswith('cuda:'):
        raise UserError(f'--device {device_name} cannot be used under torchrun: each process takes cuda:LOCAL_RANK; '
                        'pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs')
    if device_name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda was requested but no CUDA device is available')
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f'torchrun started {world} processes on this node but only {torch.cuda.device_count()} '
                            'CUDA devices are visible; lower --nproc_per_node')
        torch.cuda.set_device(local)
        device_name = f'cuda:{local}'
    else:
        device_name = 'cpu'
    if not tdist.is_initialized():
        tdist.init_process_group('nccl' if use_cuda else 'gloo')
    return Dist(rank, world, local), device_name


def shutdown(dist: Dist) -> None:
    if dist.enabled and tdist.is_initialized():
        tdist.destroy_process_group()
