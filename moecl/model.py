"""The continual model: a frozen backbone with expert-carrying modules injected in place.

Base weights are never copied: wrapped modules hold references to the original projections, and
only adapter tensors (experts, gates, discriminators, heads) are trainable or saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import FFN_PROJECTIONS, LoraConfig
from .experts import SHARED, SNAPSHOT, ExpertModule, MoEFeedForward, MoELinear, Routing, snapshot_name
from .methods import REGISTRY
from .task_router import TaskRouter

IGNORE = -100
ROUTER_GROUP = "task-router"
BARE_BACKBONE = "bare backbone"  # the scoring digest of a model that adds nothing to its backbone


def answer_loss(base_model, logits, input_ids, attention_mask, labels) -> torch.Tensor:
    """Next-token loss on answer tokens only: `logits` (a vocabulary head) runs only where needed."""
    hidden = base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return F.cross_entropy(logits(hidden[keep]), targets[keep])


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per row, 1 / (rows of its class x classes present): every class weighs the same, and the
    weights sum to 1."""
    present, index, counts = labels.unique(return_inverse=True, return_counts=True)
    return 1.0 / (counts[index] * len(present)).float()


def _balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                            row_weight: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """(layers, batch, tasks) logits: weighted cross-entropy summed over layers, balanced accuracy."""
    if row_weight is None:
        row_weight = balanced_weights(labels)
    per_row = F.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]), reduction="none")
    loss = (per_row.view(logits.shape[:2]) * row_weight).sum()
    correct = (logits.argmax(-1) == labels).float()
    return loss, (correct * row_weight).sum(-1).mean().item()


def _is_gated_ffn(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in FFN_PROJECTIONS) and hasattr(module, "act_fn")


def inject_experts(backbone: nn.Module, routing: Routing, lora: LoraConfig) -> list[ExpertModule]:
    """Replace every targeted module of the backbone by its expert-carrying wrapper."""
    lora_args = (lora.r, lora.alpha, lora.dropout)
    ffn_targets = [t for t in lora.targets if t in FFN_PROJECTIONS]
    other_targets = set(lora.targets) - set(ffn_targets)
    replacements: list[tuple[nn.Module, str, ExpertModule]] = []
    for module in backbone.modules():
        for child_name, child in module.named_children():
            if ffn_targets and _is_gated_ffn(child):
                replacements.append((module, child_name, MoEFeedForward(child, routing, ffn_targets, lora_args)))
            elif child_name in other_targets and isinstance(child, nn.Linear) and not _is_gated_ffn(module):
                replacements.append((module, child_name, MoELinear(child, routing, lora_args)))
    if not replacements:
        raise ValueError(f"lora.targets {lora.targets} matched no module of the backbone")
    for parent, child_name, wrapper in replacements:
        setattr(parent, child_name, wrapper)
    return [wrapper for _, _, wrapper in replacements]


class ContinualModel(nn.Module):
    """Backbone + experts for a growing list of tasks, with one routing policy per method."""

    def __init__(self, backbone, tokenizer, method: str, lora: LoraConfig, head: str = "lm", precision: str = "fp32"):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.method = method
        self.head = head
        self.precision = precision
        self.spec = REGISTRY[method]
        self.routing = Routing(mode=self.spec.routing)
        factor = self.spec.rank_factor
        lora = dataclasses.replace(lora, r=lora.r * factor, alpha=lora.alpha * factor)
        self.wrapped = nn.ModuleList(inject_experts(backbone, self.routing, lora))
        self.heads = nn.ModuleDict()
        self.task_router = TaskRouter()
        self.tasks: list[str] = []
        self.labels: dict[str, list[str]] = {}
        self._head_fp32: torch.Tensor | None = None  # see vocabulary_logits

    @property
    def uses_shared_expert(self) -> bool:
        return self.routing.mode in ("gated", "shared")

    @property
    def uses_task_experts(self) -> bool:
        return self.routing.mode in ("gated", "task", "sum")

    @property
    def has_discriminator(self) -> bool:
        return self.routing.mode == "gated"

    def add_task(self, name: str, labels: list[str]) -> None:
        if name in self.labels:
            raise ValueError(f"task '{name}' is already in the model")
        self.tasks.append(name)
        self.labels[name] = list(labels)
        if self.uses_shared_expert and len(self.tasks) == 1:  # created here so it draws from the seeded stage
            for module in self.wrapped:
                module.add_expert(SHARED)
        if self.uses_task_experts:
            for module in self.wrapped:
                module.add_expert(name)
                if self.spec.warm_start and len(self.tasks) > 1:
                    module.experts[name].load_state_dict(module.experts[self.tasks[-2]].state_dict())
            self.routing.task_experts = list(self.tasks)
        if self.has_discriminator:
            for module in self.ffn_modules():
                module.grow_discriminator(len(self.tasks))
        if self.head == "classifier":
            hidden = self.backbone.get_input_embeddings().embedding_dim
            self.heads[name] = nn.Linear(hidden, len(labels)).to(self.device)

    def relabel(self, name: str, labels: list[str]) -> None:
        """A known task's label set changed (allowed by the validation settings): its answers are
        the new names from now on, and a classifier head, whose rows are positions, starts afresh.
        Its expert keeps what it learned about the task's inputs."""
        if self.labels[name] == list(labels):
            return
        self.labels[name] = list(labels)
        if self.head == "classifier":
            hidden = self.backbone.get_input_embeddings().embedding_dim
            self.heads[name] = nn.Linear(hidden, len(labels)).to(self.device)

    def snapshot_shared(self, task: str) -> None:
        """From now on `task` reads a frozen copy of the shared expert as it is now: later tasks'
        training of the shared expert can no longer change its answers."""
        for module in self.wrapped:
            module.snapshot_shared(task)

    def release_snapshot(self, task: str) -> None:
        for module in self.wrapped:
            module.release_snapshot(task)

    def ffn_modules(self) -> list[MoEFeedForward]:
        return [m for m in self.wrapped if isinstance(m, MoEFeedForward)]

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    def autocast(self):
        """The context every forward runs in: mixed precision for bf16/fp16 (fp32 adapter weights are
        cast per operation), nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def vocabulary_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits computed in fp32 under any precision. Losses and label margins are
        differences of log-probabilities, and logits of 10-30 rounded to bf16 move by up to 0.125,
        close to the margins scoring ranks. The head's frozen weight is cast once and kept."""
        head = self.backbone.get_output_embeddings()
        if self.precision == "fp32":
            return head(hidden)
        if self._head_fp32 is None or self._head_fp32.device != head.weight.device:
            self._head_fp32 = head.weight.detach().float()
        with torch.autocast(self.device.type, enabled=False):
            return F.linear(hidden.float(), self._head_fp32, None if head.bias is None else head.bias.float())

    def prepare_training(self, tasks: list[str], discriminators: bool = True) -> list[nn.Parameter]:
        """Freeze every adapter tensor, then unfreeze what training `tasks` may change: the shared
        expert, these tasks' experts and gates, the discriminators (when this stage runs them) and
        these tasks' heads. An old task's expert and gate stay as they were when its stage ended.
        Nothing that gets no gradient is left trainable (data-parallel training relies on it)."""
        for module in self.wrapped:
            for name, param in module.named_parameters():
                param.requires_grad_(not name.startswith("base.") and (discriminators or not name.startswith("discriminator.")))
                if name.startswith(("experts.", "gates.")):
                    owner = name.split(".")[1]
                    param.requires_grad_(owner == SHARED or owner in tasks)
        for name, head in self.heads.items():
            head.requires_grad_(name in tasks)
        return [p for p in self.parameters() if p.requires_grad]

    def route(self, tasks_per_example: list[str], text_mask: torch.Tensor | None = None,
              adversarial_weight: float = 0.0) -> None:
        """Point every wrapped module at the experts of these examples' tasks. Given the text tokens
        and a positive adversarial weight, the forward also records the discriminators' task logits;
        with weight 0 the discriminators do not run at all."""
        state = self.routing
        state.set_tasks(tasks_per_example, self.device)
        state.disc_logits, state.disc_inputs = [], []
        collect = (self.has_discriminator and text_mask is not None and adversarial_weight > 0
                   and len(self.tasks) > 1)
        state.disc_labels = (torch.tensor([self.tasks.index(t) for t in tasks_per_example], device=self.device)
                             if collect else None)
        state.pool_mask = text_mask if collect else None
        state.adversarial_weight = adversarial_weight

    def hidden_states(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        return self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def lm_loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """`answer_loss` with fp32 logits (`vocabulary_logits`)."""
        return answer_loss(self.backbone.base_model, self.vocabulary_logits, input_ids, attention_mask, labels)

    def last_token_states(self, input_ids, attention_mask) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask)
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def class_logits(self, input_ids, attention_mask, task: str) -> torch.Tensor:
        """Per-task head on the last real token of each prompt (the official code's mode), in fp32."""
        states = self.last_token_states(input_ids, attention_mask)
        with torch.autocast(self.device.type, enabled=False):
            return self.heads[task](states.float())

    def classifier_loss(self, input_ids, attention_mask, tasks_per_example: list[str],
                        class_labels: torch.Tensor, total: int | None = None) -> torch.Tensor:
        """Head loss summed over rows with a label (>= 0), each through its own task's head, divided
        by `total` (default: those rows; a share of a larger batch passes the whole batch's count)."""
        states = self.last_token_states(input_ids, attention_mask)
        losses = []
        for task in dict.fromkeys(tasks_per_example):
            rows = [i for i, t in enumerate(tasks_per_example) if t == task and class_labels[i] >= 0]
            if rows:
                with torch.autocast(self.device.type, enabled=False):  # fp32 logits, as class_logits
                    logits = self.heads[task](states[rows].float())
                losses.append(F.cross_entropy(logits, class_labels[rows], reduction="sum"))
        return sum(losses) / (total or (class_labels >= 0).sum())

    def orthogonality_loss(self, task: str) -> torch.Tensor:
        """O-LoRA: sum of |A_task A_old^T| over every earlier task expert, so the new task's
        low-rank subspace stays orthogonal to the old ones."""
        total = torch.zeros((), device=self.device)
        for module in self.wrapped:
            for old in self.tasks[: self.tasks.index(task)]:
                for proj, lora in module.experts[task].items():
                    total = total + (lora.A @ module.experts[old][proj].A.T).abs().sum()
        return total

    def discriminator_loss(self, row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """The per-layer discriminators' class-balanced cross-entropies, summed over layers, and
        their balanced accuracy (mean over layers).

        Summed, not averaged: a layer's reversed gradient reaches only that layer's shared expert
        (its input is detached), so with a mean each shared expert would feel λ / layers. λ is per
        layer. A batch holds many current-task rows and a few memory rows; unweighted, always
        answering "the current task" would already score 80%. Each task present weighs the same
        instead, so a discriminator that ignores its input scores 1 / (tasks in the batch).
        `row_weight`: each row's weight when these rows are a share of a larger batch (see
        `balanced_weights`)."""
        state = self.routing
        return _balanced_cross_entropy(torch.stack(state.disc_logits), state.disc_labels, row_weight)

    def rediscriminate(self, inputs: list[torch.Tensor], labels: torch.Tensor,
                       row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """`discriminator_loss` again from what the discriminators read in a forward (`disc_inputs`):
        a discriminator-only step needs no forward of the backbone."""
        logits = torch.stack([module.discriminator(x.to(module.discriminator.weight.dtype))  # fp32, outside autocast
                              for module, x in zip(self.ffn_modules(), inputs)])
        return _balanced_cross_entropy(logits, labels, row_weight)

    def scoring_groups(self, task: str) -> list[str]:
        """The adapter groups (`adapter_groups`) a task's answers are computed from, given the task:
        its expert with its gates, the shared expert it reads (its snapshot, once it has one), every
        task expert in weight-space sum mode, and its head. Nothing with the bare backbone. The
        discriminators and the task-free router never take part in scoring."""
        if self.routing.bypass:
            return []
        mode, groups = self.routing.mode, []
        if mode in ("gated", "shared"):
            snapshot = snapshot_name(task)
            groups.append(f"expert-{snapshot if snapshot in self.wrapped[0].experts else SHARED}")
        if mode in ("gated", "task"):
            groups.append(f"expert-{task}")
        if mode == "sum":
            groups += [f"expert-{t}" for t in self.routing.task_experts]
        if task in self.heads:
            groups.append(f"head-{task}")
        return groups

    def scoring_digest(self, task: str) -> str:
        """A digest of every tensor `task`'s answers read (besides the frozen backbone): equal digests,
        equal answers on the same inputs and settings. BARE_BACKBONE when what it reads adds nothing
        (no head, every LoRA's B zero, as in fresh experts: gates then mix equal streams), so the
        first task's score before training is the bare backbone's, already measured."""
        groups, digest = self.adapter_groups(), hashlib.sha256()
        reads = self.scoring_groups(task)
        if not any(g.startswith("head-") for g in reads) and not any(
                tensor.any() for g in reads for name, tensor in groups[g].items() if name.endswith(".B")):
            return BARE_BACKBONE
        for group in reads:
            for name, tensor in sorted(groups[group].items()):
                digest.update(f"{group}/{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def adapter_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """Adapter tensors grouped for saving: one group per expert (a task's gates go with it),
        one for the discriminators ('router'), one per task head, and the task-free router's
        statistics. Base weights are never included."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for i, module in enumerate(self.wrapped):
            for name, tensor in module.state_dict().items():
                if name.startswith("base."):
                    continue
                owned = name.startswith(("experts.", "gates."))
                group = f"expert-{name.split('.')[1]}" if owned else "router"
                groups.setdefault(group, {})[f"{i}.{name}"] = tensor
        for task, head in self.heads.items():
            groups[f"head-{task}"] = dict(head.state_dict())
        if self.task_router.tasks:
            groups[ROUTER_GROUP] = self.task_router.state_dict()
        return groups

    def load_adapter_groups(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        for group in groups:  # snapshots of the shared expert are made by training: make room for them
            if group.startswith(f"expert-{SNAPSHOT}"):
                name = group.removeprefix("expert-")
                for module in self.wrapped:
                    if name not in module.experts:
                        module.add_expert(name)
                        module.experts[name].requires_grad_(False)
        expected = set(self.adapter_groups()) - {ROUTER_GROUP}
        if set(groups) - {ROUTER_GROUP} != expected:
            raise ValueError(f"checkpoint holds {sorted(groups)}, the model expects {sorted(expected)}")
        for task, head in self.heads.items():
            head.load_state_dict(groups[f"head-{task}"])
        if ROUTER_GROUP in groups:
            self.task_router.load_state_dict(groups[ROUTER_GROUP])
        per_module: dict[int, dict[str, torch.Tensor]] = {}
        for group, tensors in groups.items():
            if group.startswith("head-") or group == ROUTER_GROUP:
                continue
            for key, tensor in tensors.items():
                index, name = key.split(".", 1)
                per_module.setdefault(int(index), {})[name] = tensor
        for i, module in enumerate(self.wrapped):
            missing, unexpected = module.load_state_dict(per_module.get(i, {}), strict=False)
            missing = [m for m in missing if not m.startswith("base.")]
            if missing or unexpected:
                raise ValueError(f"adapter tensors do not match module {i}: missing {missing}, unexpected {unexpected}")
