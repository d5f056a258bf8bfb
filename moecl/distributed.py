"""Data parallelism over the processes torchrun starts: one per GPU, or several on CPU with gloo.

    torchrun --standalone --nproc-per-node N -m moecl train CONFIG --out DIR

Every process builds the same model from the same seeds and walks the same global batches. Each
computes the loss of its share of a batch, divided by the whole batch's sizes, and DDP sums the
gradients, so N processes take the steps one process takes. Evaluation is sharded the same way and
the correct answers are summed. Only rank 0 writes files. With `train.parallel: fsdp` the frozen
backbone's layers are sharded over the processes too (`shard_backbone`). Without torchrun's environment this is a
world of one process and nothing here talks to anyone.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.tensor import DTensor

from .backbone import resolve_device

log = logging.getLogger("moecl")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: list) -> list:
        """This process's share of a list: every size-th item, from its rank."""
        return items[self.rank::self.size]

    def even_shard(self, items: list) -> tuple[list, int]:
        """(this process's share, how many of it are real): every process gets the same number of
        items, the shortfall padded with the list's last item, so that every process runs the same
        forwards (sharded layers gather their weights from all processes in each forward)."""
        mine = self.shard(items)
        width = -(-len(items) // self.size)
        return mine + items[-1:] * (width - len(mine)), len(mine)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """What DDP does on the last backward: every process's gradients replaced by their mean, in
        one collective over a flat buffer (which also takes gradients of any memory layout)."""
        if not self.distributed:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)  # a process whose passes left it unused still joins
        grads = [param.grad for param in params]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)
        flat /= self.size
        for grad, mean in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(mean.view(grad.shape))

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over every process."""
        if not self.distributed:
            return list(values)
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def join(device: str) -> World:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK), joined
    once per process: NCCL on GPUs (each process on the GPU of its local rank), gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return world


def shard_backbone(model, world: World) -> None:
    """FSDP over the frozen backbone: each decoder layer's base weights are split over the
    processes and gathered for its forward and backward only, so a process holds about 1/N of
    them. Everything moecl adds (experts, gates, discriminators, snapshots, and any added later)
    stays whole in every process and is averaged like DDP (`average_gradients`); so do the
    embeddings, tied to the output layer in many models, and the final norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    stack = model.backbone.base_model
    layers = getattr(stack, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"train.parallel fsdp: {type(stack).__name__} has no `layers` list of decoder layers to shard")
    mesh = init_device_mesh(model.device.type, (world.size,))
    in_layers = {id(p) for p in layers.parameters()}
    ours = {p for m in model.wrapped for n, p in m.named_parameters() if not n.startswith("base.")}
    ignored = ours | {p for p in stack.parameters() if id(p) not in in_layers}
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(stack, mesh=mesh, ignored_params=ignored)  # the root: schedules the layers, owns no weights
    sharded = [p for p in layers.parameters() if isinstance(p, DTensor)]
    log.info("fsdp: %d decoder layers sharded over %d processes, %.2fM of their %.2fM base weights held here",
             len(layers), world.size, sum(p.to_local().numel() for p in sharded) / 1e6,
             sum(p.numel() for p in sharded) / 1e6)


def process_device(device: str, world: World) -> str:
    """The device setting for this process: its own GPU when several processes share a node's GPUs."""
    resolved = resolve_device(device)
    return f"cuda:{world.local_rank}" if resolved.type == "cuda" and world.distributed else str(resolved)


def torchrun(config: dict, run_dir: Path, processes: int, start: Path | None = None) -> dict:
    """Train `config` (a Config as a dict) in `processes` processes on this node with torchrun, as
    `moecl train` would; continue the checkpoint `start` when given. Returns the run's metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "moecl", "train", str(config_file), "--out", str(run_dir)]
    if start is not None:
        command += ["--from", str(start)]
    done = subprocess.run(command)  # the processes' output goes to this step's log as it comes
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} processes failed (exit {done.returncode}): {' '.join(command)}")
    return json.loads((run_dir / "metrics.json").read_text())
