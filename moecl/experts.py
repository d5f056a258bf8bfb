"""LoRA experts wrapped around a frozen backbone's projections.

A wrapped module keeps the base layer untouched and adds low-rank deltas. Which experts run for an
input, and how their outputs are combined, is a `Routing` decision shared by all wrapped modules:

- "gated" (MoE-CL): the shared expert and the input's task expert, mixed per token by that task's own
  softmax gate (frozen with its expert, so old tasks' mixes never move); what the shared expert adds
  to the FFN output, pooled over the text tokens, also feeds a task discriminator through gradient
  reversal.
- "shared": one expert for every task (sequential LoRA, replay, multi-task).
- "task": only the input's task expert (incremental LoRA; the task is given).
- "sum": every task expert added in weight space (O-LoRA).

The frozen base projections run once per input whatever the number of experts: experts only add
their low-rank deltas, and in the FFN the expert hidden states are mixed before the (linear) down
projection, so the base down projection also runs once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SHARED = "shared"
LIVE = "live"  # the stream of the live shared expert, whatever the rows' tasks (what the discriminator reads)
SNAPSHOT = "shared@"  # '@' cannot occur in a task name
ROUTING_MODES = ("gated", "shared", "task", "sum")


def snapshot_name(task: str) -> str:
    return f"{SNAPSHOT}{task}"


class LoRA(nn.Module):
    """One low-rank factor pair: delta(x) = scale * B @ A @ x. A starts random and B at zero, so a
    new expert leaves the model's output unchanged until it is trained. Dropout is applied by the
    owning module (`ExpertModule.keep_mask`), one mask per input position shared by every expert
    reading it (in the FFN, the two experts' hidden states share one mask too).

    B, shaped (out, r) like a linear layer's weight, is stored column-major: the multiplies read its
    transpose, contiguous, so autograd forms B's gradient as z^T G (short and wide) rather than G^T z,
    several times faster on a CPU; checkpoints hold the same (out, r) tensors either way."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(r, out_features).T)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A) * self.scale, self.B)


def _add_low_rank(out: torch.Tensor, z: torch.Tensor, B_t: torch.Tensor) -> torch.Tensor:
    """out + z @ B_t (B_t: the (r, out) transpose of B) as one fused multiply-add over the flattened tokens."""
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]), B_t)
    return flat.view(out.shape)


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    return GradientReversal.apply(x, weight)


@dataclass
class Routing:
    """Per-forward state every wrapped module reads: set by the model before each call."""
    mode: str
    task_experts: list[str] = field(default_factory=list)  # every task expert, in task order
    batch_tasks: list[str] = field(default_factory=list)  # the task experts this batch uses, in order
    row_mask: torch.Tensor | None = None  # (batch, len(batch_tasks)) one-hot task of each row; None: one task
    disc_labels: torch.Tensor | None = None  # task index per example; None: no discriminator this call
    pool_mask: torch.Tensor | None = None  # (batch, seq) 1 on the text tokens the discriminator pools
    adversarial_weight: float = 0.0
    bypass: bool = False  # run the bare backbone (the no-training baseline)
    disc_logits: list[torch.Tensor] = field(default_factory=list)
    disc_inputs: list[torch.Tensor] = field(default_factory=list)  # what each discriminator read, detached

    def set_tasks(self, task_per_example: list[str], device: torch.device) -> None:
        self.batch_tasks = list(dict.fromkeys(task_per_example))
        self.row_mask = None
        if len(self.batch_tasks) > 1:
            index = torch.tensor([self.batch_tasks.index(t) for t in task_per_example], device=device)
            self.row_mask = F.one_hot(index, len(self.batch_tasks)).float()


class ExpertModule(nn.Module):
    """Common part of a wrapped module: its experts (one LoRA per adapted projection) and, in gated
    mode, one gate per task."""

    def __init__(self, routing: Routing, projections: dict[str, nn.Linear], lora_args: tuple[int, float, float],
                 gate_features: int):
        super().__init__()
        self.routing = [routing]  # a list, so the shared state is not registered as a submodule
        self.shapes = {name: (p.in_features, p.out_features) for name, p in projections.items()}
        self.lora_args = lora_args
        self.gate_features = gate_features
        self.experts = nn.ModuleDict()
        self.gates = nn.ModuleDict()

    @property
    def state(self) -> Routing:
        return self.routing[0]

    def add_expert(self, name: str) -> None:
        r, alpha, _ = self.lora_args
        device = next(iter(self.parameters()), torch.empty(0)).device
        self.experts[name] = nn.ModuleDict(
            {proj: LoRA(i, o, r, alpha) for proj, (i, o) in self.shapes.items()}).to(device)
        if self.state.mode == "gated" and name != SHARED and not name.startswith(SNAPSHOT):
            gate = nn.Linear(self.gate_features, 2, bias=False)
            nn.init.zeros_(gate.weight)  # start as an even mix of shared and task expert
            self.gates[name] = gate.to(device)

    def snapshot_shared(self, task: str) -> None:
        """Freeze a copy of the shared expert as `task` will read it from now on."""
        name = snapshot_name(task)
        if name not in self.experts:
            self.add_expert(name)
        self.experts[name].load_state_dict(self.experts[SHARED].state_dict())
        self.experts[name].requires_grad_(False)

    def release_snapshot(self, task: str) -> None:
        """`task` is trained again: it reads the live shared expert until its stage ends."""
        if snapshot_name(task) in self.experts:
            del self.experts[snapshot_name(task)]

    def keep_mask(self, like: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """(a fresh 0/1 LoRA-dropout mask in `like`'s shape, or None outside training; the 1/(1-p)
        the rank side applies to inputs under it). Drawn as uniforms compared with p, the law of
        bernoulli_, which on CPUs that MKL's generator skips (AMD) costs twice as much. Kept 0/1 so
        no pass over the input width scales it."""
        p = self.lora_args[2]
        if not self.training or p == 0:
            return None, 1.0
        return torch.rand_like(like) >= p, 1 / (1 - p)

    def _dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x under a fresh dropout mask, the scale the rank side applies)."""
        keep, scale = self.keep_mask(x)
        return (x if keep is None else x * keep), scale

    def _stream_experts(self, stream: str) -> tuple[list[str], torch.Tensor | None]:
        """The experts a stream adds up, and which rows each serves (None: every row). A task with
        a snapshot of the shared expert reads that snapshot; the task being trained reads the live one."""
        if stream == LIVE:
            return [SHARED], None
        if stream == SHARED:
            names = [snapshot_name(t) if snapshot_name(t) in self.experts else SHARED for t in self.state.batch_tasks]
            if len(set(names)) <= 1:
                return names[:1] or [SHARED], None
            return names, self.state.row_mask
        if self.state.mode == "sum":
            return self.state.task_experts, None
        return self.state.batch_tasks, self.state.row_mask

    def _factors(self, stream: str, proj: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A, B^T, row mask) of a stream's experts on one projection, acting as one concatenated factor
        pair; rows of a mixed-task batch mask out the other tasks' rank-r slices (None: no masking)."""
        names, row_mask = self._stream_experts(stream)
        loras = [self.experts[n][proj] for n in names]
        if len(loras) == 1:
            return loras[0].A, loras[0].B.T, None
        return torch.cat([lora.A for lora in loras]), torch.cat([lora.B.T for lora in loras]), row_mask

    def add_deltas(self, x: torch.Tensor, targets: list[tuple], scale: float = 1.0) -> list[torch.Tensor]:
        """For each target `(stream, proj, out)` or `(stream, proj, out, weight)`: `out` plus the
        stream's low-rank delta of `scale * x` (`x` under its 0/1 dropout mask, `scale` the mask's
        1/(1-p)), optionally weighted per token. All targets read the same `x`, so their projections
        to rank space run as one matrix multiply. Scales, weight and row mask apply on the rank
        side: nothing extra runs over the input or output width."""
        results = [target[2] for target in targets]
        adapted = [i for i, target in enumerate(targets) if target[1] in self.shapes]
        if not adapted:
            return results
        factors = [self._factors(*targets[i][:2]) for i in adapted]
        A = factors[0][0] if len(factors) == 1 else torch.cat([f[0] for f in factors])
        r, alpha, _ = self.lora_args
        rank_inputs = (F.linear(x, A) * (scale * alpha / r)).split([f[0].shape[0] for f in factors], dim=-1)
        for i, (_, B_t, row_mask), z in zip(adapted, factors, rank_inputs):
            if row_mask is not None:
                z = z * row_mask.repeat_interleave(r, dim=1).view(z.shape[0], *[1] * (z.dim() - 2), -1)
            if len(targets[i]) > 3:
                z = z * targets[i][3]
            results[i] = _add_low_rank(results[i], z, B_t)
        return results

    def add_delta(self, stream: str, proj: str, out: torch.Tensor, x: torch.Tensor,
                  weight: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """`out` plus one stream's (optionally weighted) low-rank delta of `scale * x`."""
        return self.add_deltas(x, [(stream, proj, out) if weight is None else (stream, proj, out, weight)], scale)[0]

    def streams(self) -> list[str]:
        return {"gated": [SHARED, "task"], "shared": [SHARED], "task": ["task"], "sum": ["task"]}[self.state.mode]

    def mix_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 2) per-token softmax weights over [shared, task], each row from its own task's gate."""
        tasks, row_mask = self.state.batch_tasks, self.state.row_mask
        if row_mask is None:
            return torch.softmax(self.gates[tasks[0]](x), dim=-1)
        weight = torch.cat([self.gates[t].weight for t in tasks])  # (2 * tasks, features)
        logits = F.linear(x, weight).unflatten(-1, (len(tasks), 2))  # (batch, ..., tasks, 2)
        rows = row_mask.view(row_mask.shape[0], *[1] * (x.dim() - 2), len(tasks), 1)
        return torch.softmax((logits * rows).sum(-2), dim=-1)

    def shared_weight(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 1) the shared expert's weight; the task expert's is 1 minus it."""
        return self.mix_weights(x)[..., :1]


class MoEFeedForward(ExpertModule):
    """Wraps a gated FFN (`down(act(gate(x)) * up(x))`, as in Llama, Mistral, Qwen) whose
    projections carry experts; the module-level gate and the discriminator live here."""

    def __init__(self, ffn: nn.Module, routing: Routing, targets: list[str], lora_args):
        projections = {p: getattr(ffn, p) for p in ("gate_proj", "up_proj", "down_proj") if p in targets}
        super().__init__(routing, projections, lora_args, ffn.gate_proj.in_features)
        self.base = ffn
        self.discriminator: nn.Linear | None = None  # created with the first task, grown with each

    def grow_discriminator(self, num_tasks: int) -> None:
        """One logit per task; rows for the tasks already known are kept."""
        old = self.discriminator
        new = nn.Linear(self.base.gate_proj.in_features, num_tasks).to(self.base.gate_proj.weight.device)
        if old is not None:
            with torch.no_grad():
                new.weight[: old.out_features] = old.weight
                new.bias[: old.out_features] = old.bias
        self.discriminator = new

    def _hidden(self, streams: list[str], x: torch.Tensor, gx: torch.Tensor, ux: torch.Tensor,
                scale: float = 1.0) -> list[torch.Tensor]:
        """Each stream's FFN hidden state act(gate(x)) * up(x), its deltas (of `scale * x`) added to
        the base `gx`, `ux`."""
        projected = self.add_deltas(x, [(s, p, base) for s in streams for p, base in (("gate_proj", gx), ("up_proj", ux))],
                                    scale)
        return [self.base.act_fn(gate) * up for gate, up in zip(projected[::2], projected[1::2])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.bypass:
            return self.base(x)
        x_in, in_scale = self._dropped(x)
        gx, ux = self.base.gate_proj(x), self.base.up_proj(x)
        streams = self.streams()
        hidden = self._hidden(streams, x_in, gx, ux, in_scale)
        if len(streams) == 1:
            hidden_in, scale = self._dropped(hidden[0])
            return self.add_delta(streams[0], "down_proj", self.base.down_proj(hidden[0]), hidden_in, scale=scale)

        w_shared = self.shared_weight(x).to(hidden[0].dtype)  # autocast computes the softmax in fp32
        # The base down projection is linear: applying it once to the mixed hidden state equals
        # mixing the two experts' outputs.
        out = self.base.down_proj(torch.lerp(hidden[1], hidden[0], w_shared))
        w_task = 1 - w_shared
        shared_in, task_in = hidden
        keep, scale = self.keep_mask(hidden[0])
        if keep is not None:  # one dropout mask for both experts' inputs; its 1/(1-p) on the rank side
            shared_in, task_in, w_shared, w_task = shared_in * keep, task_in * keep, w_shared * scale, w_task * scale
        out = self.add_delta(SHARED, "down_proj", out, shared_in, w_shared)
        out = self.add_delta("task", "down_proj", out, task_in, w_task)
        if state.disc_labels is not None:
            self._discriminate(x, gx, ux)
        return out

    def _discriminate(self, x: torch.Tensor, gx: torch.Tensor, ux: torch.Tensor) -> None:
        """Task logits from what the shared expert adds to the FFN output, mean-pooled over the
        text tokens.

        The layer input is detached: the reversed gradient reaches this layer's shared expert and
        nothing upstream (no dedicated expert, no gate, no earlier layer). It reads the shared
        expert's contribution, not the whole FFN output: the frozen base FFN tells tasks apart on
        its own, which the shared expert could not undo. Only text tokens are computed; pooling
        commutes with the (linear) down projection, so that runs on the pooled vector."""
        tokens = self.state.pool_mask.flatten().nonzero().squeeze(1)
        rows = tokens // self.state.pool_mask.shape[1]
        batch, device = self.state.pool_mask.shape[0], x.device.type
        # The shared expert's hidden state minus the base FFN's is a small difference of two large,
        # near-equal states: in fp32 under any precision (bf16 would round most of it away).
        with torch.autocast(device, enabled=False):
            x, gx, ux = (t.detach().flatten(0, -2)[tokens].float() for t in (x, gx, ux))
            pool = F.one_hot(rows, batch).T.to(x.dtype)
            pool = pool / pool.sum(dim=1, keepdim=True).clamp(min=1)  # (batch, tokens) averaging weights
            with torch.no_grad():  # the base FFN's part carries no gradient: pool it on its own
                pooled_base = pool @ (self.base.act_fn(gx) * ux)
            shared_hidden, = self._hidden([LIVE], x, gx, ux)
            pooled_shared = pool @ shared_hidden
            difference = pooled_shared - pooled_base
        pooled = self.add_delta(LIVE, "down_proj", self.base.down_proj(difference), pooled_shared).float()
        with torch.autocast(device, enabled=False):  # the discriminator and its loss (subtracted from the task loss)
            logits = self.discriminator(reverse_gradient(pooled, self.state.adversarial_weight))
        self.state.disc_logits.append(logits)
        self.state.disc_inputs.append(pooled.detach())


class MoELinear(ExpertModule):
    """Wraps any other target projection (e.g. attention q/k/v/o): base output plus routed deltas,
    mixed by this module's own gate in 'gated' mode."""

    def __init__(self, base: nn.Linear, routing: Routing, lora_args):
        super().__init__(routing, {"proj": base}, lora_args, base.in_features)
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.state.bypass:
            return out
        x_in, scale = self._dropped(x)
        streams = self.streams()
        if len(streams) == 1:
            return self.add_delta(streams[0], "proj", out, x_in, scale=scale)
        w_shared = self.shared_weight(x)
        out = self.add_delta(SHARED, "proj", out, x_in, w_shared, scale)
        return self.add_delta("task", "proj", out, x_in, 1 - w_shared, scale)
