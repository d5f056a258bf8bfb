"""Every continual-learning method the trainer runs, each described in one place.

A method is what differs between MoE-CL, its ablation, the baselines and the controls: how a row's
FFN output is formed (routing), what it keeps of finished tasks (memory), which extra losses act,
how a new task's expert starts, and what a stage leaves frozen. The model and the trainer read
these fields; none of them branches on a method's name. Adding a method is adding one entry here.

Routing modes: "gated" (a task expert and the shared expert mixed by the task's gate), "shared" (one
adapter for every task), "task" (each task its own adapter, frozen after its stage), "sum" (every
task's adapter added, O-LoRA). Memory: "none"; "rehearse" (inputs with their gold answers, trained
on); "probe" (inputs only: read by the discriminator and, with retention.distill, distilled toward
the model's own answers, so no labels are kept).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    routing: str
    summary: str
    memory: str = "none"
    adversarial: bool = False  # MoE-CL's discriminator term acts (adversarial.weight)
    orthogonality: bool = False  # O-LoRA's term keeps each new adapter orthogonal to the old ones
    joint: bool = False  # every task in one stage (the multi-task upper bound, not continual)
    warm_start: bool = False  # a new task's adapter starts as the previous task's final adapter
    rank_factor: int = 1  # task adapters at this multiple of lora.r (and lora.alpha: the same scale)

    @property
    def shared_expert_with_gate(self) -> bool:
        """MoE-CL's architecture: retention.* (snapshots, distillation, drift) applies."""
        return self.routing == "gated"


REGISTRY = {m.name: m for m in (
    Method("moecl", "gated", "MoE-CL: dedicated + shared expert per layer, gate, adversarial shared expert",
           memory="probe", adversarial=True),
    Method("moecl-nogan", "gated", "MoE-CL without the adversary: the same memory, batches and draws, λ = 0",
           memory="probe"),
    Method("seq-lora", "shared", "one LoRA trained on each task in turn (forgets)"),
    Method("inc-lora", "task", "a new LoRA per task, earlier ones frozen"),
    Method("inc-lora-warm", "task", "inc-lora whose new LoRA starts from the previous task's (isolates a warm start)",
           warm_start=True),
    Method("inc-lora-r16", "task", "inc-lora at twice lora.r (16 at the default 8): the parameters of MoE-CL's "
           "two experts per task", rank_factor=2),
    Method("replay", "shared", "seq-lora rehearsing a few labelled inputs of every finished task", memory="rehearse"),
    Method("olora", "sum", "O-LoRA: adapters summed, each new one kept orthogonal to the old", orthogonality=True),
    Method("mtl", "shared", "every task at once (an upper bound, not continual)", joint=True),
)}

# What a config that names no method trains, and what the pipeline retrains with. inc-lora-warm, not
# moecl: on MTL5 order1 (3 seeds) moecl's lead over IncLoRA is all warm start (moecl minus inc-lora-warm
# -2.7 ± 4.0 AA), and on the held-out pair inc-lora-warm is ahead (+1.7 ± 1.2), with half the
# parameters per task and no discriminator (README, Results). moecl stays one `method: moecl` away.
DEFAULT = "inc-lora-warm"
