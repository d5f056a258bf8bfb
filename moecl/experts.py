"""LoRA experts wrapped around a frozen backbone's projections.

A wrapped module keeps the base layer untouched and adds low-rank deltas. Which experts run for an
input, and how their outputs are combined, is a `Routing` decision shared by all wrapped modules:

- "gated" (MoE-CL): the shared expert and the input's task expert, mixed per token by a softmax gate;
  the shared expert's pooled FFN output also feeds a task discriminator through gradient reversal.
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
ROUTING_MODES = ("gated", "shared", "task", "sum")


class LoRA(nn.Module):
    """One low-rank delta `scale * B @ A @ dropout(x)`; A starts random and B at zero, so a new
    expert leaves the model's output unchanged until it is trained."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def project_down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dropout(x), self.A)

    def project_up(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_up(self.project_down(x))


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
    groups: list[tuple[str, torch.Tensor | None]] = field(default_factory=list)  # (task expert, example rows)
    disc_labels: torch.Tensor | None = None  # task index per example; None: no discriminator this call
    pool_mask: torch.Tensor | None = None  # (batch, seq) 1 for real tokens
    adversarial_weight: float = 0.0
    bypass: bool = False  # run the bare backbone (the no-training baseline)
    disc_logits: list[torch.Tensor] = field(default_factory=list)

    def set_tasks(self, expert_per_example: list[str], device: torch.device) -> None:
        names = list(dict.fromkeys(expert_per_example))
        if len(names) == 1:
            self.groups = [(names[0], None)]
            return
        self.groups = [
            (name, torch.tensor([i for i, n in enumerate(expert_per_example) if n == name], device=device))
            for name in names
        ]


class ExpertModule(nn.Module):
    """Common part of a wrapped module: its experts (one LoRA per adapted projection) and its gate."""

    def __init__(self, routing: Routing, projections: dict[str, nn.Linear], lora_args: tuple[int, float, float],
                 gate_features: int):
        super().__init__()
        self.routing = [routing]  # a list, so the shared state is not registered as a submodule
        self.shapes = {name: (p.in_features, p.out_features) for name, p in projections.items()}
        self.lora_args = lora_args
        self.experts = nn.ModuleDict()
        self.gate = nn.Linear(gate_features, 2, bias=False) if routing.mode == "gated" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)  # start as an even mix of shared and task expert

    @property
    def state(self) -> Routing:
        return self.routing[0]

    def add_expert(self, name: str) -> None:
        r, alpha, dropout = self.lora_args
        device = next(iter(self.parameters()), torch.empty(0)).device
        self.experts[name] = nn.ModuleDict(
            {proj: LoRA(i, o, r, alpha, dropout) for proj, (i, o) in self.shapes.items()}).to(device)

    def delta(self, stream: str, proj: str, x: torch.Tensor) -> torch.Tensor | float:
        """Low-rank delta of one stream ('shared' or 'task') or, in 'sum' mode, of every task expert."""
        if proj not in self.shapes:
            return 0.0
        if stream == SHARED:
            return self.experts[SHARED][proj](x)
        if self.state.mode == "sum":
            return sum(self.experts[name][proj](x) for name in self.state.task_experts)
        groups = self.state.groups
        if len(groups) == 1 and groups[0][1] is None:
            return self.experts[groups[0][0]][proj](x)
        out = x.new_zeros(*x.shape[:-1], self.shapes[proj][1])
        for name, rows in groups:
            out = out.index_copy(0, rows, self.experts[name][proj](x.index_select(0, rows)))
        return out

    def streams(self) -> list[str]:
        return {"gated": [SHARED, "task"], "shared": [SHARED], "task": ["task"], "sum": ["task"]}[self.state.mode]

    def mix_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 2) softmax weights over [shared, task]."""
        return torch.softmax(self.gate(x), dim=-1)


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

    def _hidden(self, stream: str, x: torch.Tensor, gx: torch.Tensor, ux: torch.Tensor) -> torch.Tensor:
        return self.base.act_fn(gx + self.delta(stream, "gate_proj", x)) * (ux + self.delta(stream, "up_proj", x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.bypass:
            return self.base(x)
        gx, ux = self.base.gate_proj(x), self.base.up_proj(x)
        streams = self.streams()
        hidden = [self._hidden(s, x, gx, ux) for s in streams]
        if len(streams) == 1:
            return self.base.down_proj(hidden[0]) + self.delta(streams[0], "down_proj", hidden[0])

        weights = self.mix_weights(x)
        w_shared, w_task = weights[..., :1], weights[..., 1:]
        mixed = w_shared * hidden[0] + w_task * hidden[1]
        out = self.base.down_proj(mixed)
        shared_low = None
        if "down_proj" in self.shapes:
            shared_lora = self.experts[SHARED]["down_proj"]
            shared_low = shared_lora.project_down(hidden[0])
            out = out + w_shared * shared_lora.project_up(shared_low) + w_task * self.delta("task", "down_proj", hidden[1])
        if state.disc_labels is not None:
            self._discriminate(hidden[0], shared_low)
        return out

    def _discriminate(self, shared_hidden: torch.Tensor, shared_low: torch.Tensor | None) -> None:
        """Task logits from the shared expert's FFN output, mean-pooled over real tokens.

        Pooling commutes with the linear down projection, so pooling the hidden state first gives the
        pooled output exactly without running the base down projection a second time per token."""
        mask = self.state.pool_mask.unsqueeze(-1).to(shared_hidden.dtype)
        count = mask.sum(dim=1).clamp(min=1)
        pooled = self.base.down_proj((shared_hidden * mask).sum(dim=1) / count)
        if shared_low is not None:
            pooled = pooled + self.experts[SHARED]["down_proj"].project_up((shared_low * mask).sum(dim=1) / count)
        logits = self.discriminator(reverse_gradient(pooled, self.state.adversarial_weight))
        self.state.disc_logits.append(logits)


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
        streams = self.streams()
        if len(streams) == 1:
            return out + self.delta(streams[0], "proj", x)
        weights = self.mix_weights(x)
        return out + weights[..., :1] * self.delta(SHARED, "proj", x) + weights[..., 1:] * self.delta("task", "proj", x)
