"""Run configuration: typed dataclasses read strictly from YAML.

Every key is checked before anything expensive happens, so a typo in a config fails in a second
with the file and the key named, instead of after an hour of training with a default silently used.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .methods import DEFAULT, REGISTRY

METHODS = tuple(REGISTRY)
HEADS = ("lm", "classifier")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")
TASK_NAME_RULE = f"{TASK_NAME.pattern}, not 'shared' (the shared expert's name)"


def is_task_name(name: str) -> bool:
    return bool(TASK_NAME.fullmatch(name)) and name != "shared"


class ConfigError(ValueError):
    """A config that cannot be run; the message names the file and the offending key."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(FFN_PROJECTIONS))


@dataclass
class AdversarialConfig:
    """MoE-CL's adversary. `weight` is λ per layer: each layer's shared expert receives -λ times the
    gradient of its own layer's discriminator loss. The discriminators learn at `lr` (default: the
    adapters' train.lr) and take `inner_steps` steps per training step: the joint one, then
    discriminator-only ones on the pooled features the step's forward produced (no extra backbone
    pass), so a probe of a few hundred numbers per layer keeps up with the shared expert. λ rises
    linearly over each stage's first `ramp_steps` steps (0: from the first step)."""
    weight: float = 0.1
    lr: float | None = None
    inner_steps: int = 4
    ramp_steps: int = 0


@dataclass
class MemoryConfig:
    """Examples kept from each finished task: the discriminator's view of old tasks (moecl)
    or the rehearsal buffer (replay). `per_batch` of them join every training batch."""
    per_task: int = 16
    per_batch: int = 2


@dataclass
class RetentionConfig:
    """What keeps old tasks' answers while the shared expert trains on a new task (moecl methods).

    `shared`: "snapshot" (default) freezes a copy of the shared expert when a task's stage ends, and
    that task reads its copy from then on: old tasks cannot be changed by later training (their
    expert and gate are frozen too), while each new task starts from, and keeps training, the
    live shared expert. "live": every task reads the one live shared expert (the paper's design;
    it moved old tasks on the held-out pair, see README). `distill`: weight of a KL term pulling
    the model's answer distribution on the memory inputs toward the model's own answers before
    this stage (the teacher's answer is its prediction: no gold labels are kept). `shared_l2`: weight of an L2 pull of the shared expert toward its
    value at the start of the stage (a bounded update). Both off by default (with "live", neither
    improved the old task in `benchmarks/retention.py`; with "snapshot" they have nothing to do)."""
    shared: str = "snapshot"
    distill: float = 0.0
    shared_l2: float = 0.0


@dataclass
class RouterConfig:
    """Task-free routing: how many training texts per task describe it (0: no router), how many
    other training texts of it set its acceptance distance, and the share of those accepted (a text
    farther from the task it is routed to than that quantile is refused as of no known task; 1.0 with
    calibrate_per_task 0 refuses nothing)."""
    fit_per_task: int = 256
    calibrate_per_task: int = 64
    accept_quantile: float = 0.995  # moecl.task_router.ACCEPT: why this value


@dataclass
class OLoraConfig:
    weight: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 8  # rows per optimizer step over all processes (torchrun) together
    # Rows per forward pass in each process; a process's share of a batch beyond it is accumulated
    # over several passes (None: the whole share in one pass). Changes memory, not the result.
    micro_batch_size: int | None = None
    lr: float = 2e-4
    max_length: int = 128
    max_per_label: int | None = None
    seed: int = 0
    max_grad_norm: float | None = None  # clip the adapters' gradient norm, and the discriminators' apart (None: no clipping)
    device: str = "auto"  # auto: CUDA when present
    # fp32, or bf16 / fp16: the frozen backbone is stored in that type and every forward runs under
    # autocast, while adapters, gates and discriminators keep fp32 master weights (fp16 adds loss scaling);
    # auto: bf16 on CUDA with bf16 and on CPUs with bf16 units (AMX or AVX-512 bf16), fp32 elsewhere
    # (backbone.resolve_precision); what it resolved to is recorded in the run. The default: measured
    # on both kinds of CPU, bf16 kept fp32's accuracy and ran a whole order1 run 2.6x faster (README).
    precision: str = "auto"
    gradient_checkpointing: bool = False  # recompute the backbone's layer activations in backward
    # Several processes: `ddp` keeps a whole backbone in each; `fsdp` shards the frozen backbone's
    # decoder layers over them (for backbones one device cannot hold), adapters stay replicated.
    parallel: str = "ddp"
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps within a stage (0: at stage ends only)


@dataclass
class EvalConfig:
    max_per_label: int | None = None
    batch_size: int = 8
    forward_transfer: bool = False
    every_stage: bool = True  # False: only the stage's own tasks after each stage, every task after the last
    routing: bool = True  # report task-free routing accuracy per task on the test sets
    # Reuse a task's accuracy while nothing its answers read has changed (ContinualModel.scoring_digest):
    # an old task whose expert, gate and shared snapshot are frozen is not scored again after each stage.
    reuse: bool = True
    # The business metric (pipeline evaluation): the share of a task's items answered automatically
    # with at least this precision, the most confident (largest label margin) first
    automation_precision: float = 0.95


@dataclass
class TaskConfig:
    name: str
    data: str
    instruction: str | None = None


@dataclass
class Config:
    tasks: list[TaskConfig]
    backbone: str = "smollm2-135m-instruct"
    method: str = DEFAULT
    head: str = "lm"
    lora: LoraConfig = field(default_factory=LoraConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    olora: OLoraConfig = field(default_factory=OLoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "lora": LoraConfig,
    "adversarial": AdversarialConfig,
    "memory": MemoryConfig,
    "retention": RetentionConfig,
    "router": RouterConfig,
    "olora": OLoraConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def _reject_unknown(raw: dict, cls, prefix: str, source: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(sorted(names))})")


def _build(cls, raw: Any, where: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(raw).__name__}")
    _reject_unknown(raw, cls, f"{where}.", source)
    try:
        return cls(**raw)
    except TypeError as err:
        raise ConfigError(f"{source}: '{where}': {err}") from None


def _resolve_path(value: str, base: Path) -> str:
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    return str(path if path.is_absolute() else (base / path).resolve())


def config_from_dict(raw: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Build and check a Config; relative task folders are taken from `base_dir`."""
    base_dir = base_dir or Path.cwd()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    _reject_unknown(raw, Config, "", source)
    if not raw.get("tasks"):
        raise ConfigError(f"{source}: 'tasks' must list at least one task")
    if not isinstance(raw["tasks"], list):
        raise ConfigError(f"{source}: 'tasks' must be a list of {{name, data}}")
    tasks = []
    for i, item in enumerate(raw["tasks"]):
        task = _build(TaskConfig, item, f"tasks[{i}]", source)
        task.data = _resolve_path(task.data, base_dir)
        tasks.append(task)
    names = [t.name for t in tasks]
    bad = [n for n in names if not is_task_name(n)]
    if bad:
        raise ConfigError(f"{source}: task name '{bad[0]}' must be {TASK_NAME_RULE}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: task names must be unique, got {names}")
    sections = {key: _build(cls, raw[key], key, source) for key, cls in _SECTIONS.items() if key in raw}
    plain = {k: raw[k] for k in ("backbone", "method", "head") if k in raw}
    cfg = Config(tasks=tasks, **plain, **sections)
    if not isinstance(cfg.backbone, str):
        raise ConfigError(f"{source}: 'backbone' must be a string")
    if (base_dir / cfg.backbone).is_dir():  # a local model folder, given relative to the config
        cfg.backbone = str((base_dir / cfg.backbone).resolve())
    try:
        _check(cfg, source)
    except TypeError as err:  # e.g. lr: "fast"
        raise ConfigError(f"{source}: a value has the wrong type: {err}") from None
    return cfg


def _check(cfg: Config, source: str) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"{source}: method '{cfg.method}' is not one of {', '.join(METHODS)}")
    if cfg.head not in HEADS:
        raise ConfigError(f"{source}: head '{cfg.head}' is not one of {', '.join(HEADS)}")
    if cfg.lora.r < 1 or not cfg.lora.targets:
        raise ConfigError(f"{source}: lora needs r >= 1 and at least one target")
    if REGISTRY[cfg.method].shared_expert_with_gate and not set(cfg.lora.targets) & set(FFN_PROJECTIONS):
        raise ConfigError(
            f"{source}: method {cfg.method} needs an FFN projection ({', '.join(FFN_PROJECTIONS)}) in lora.targets: "
            "the discriminator reads the shared expert's FFN output")
    checks = [
        (cfg.train.device in DEVICES, f"train.device must be one of {', '.join(DEVICES)}"),
        (cfg.train.precision in (*PRECISIONS, "auto"), f"train.precision must be one of {', '.join(PRECISIONS)} or auto"),
        (cfg.train.parallel in PARALLEL, f"train.parallel must be one of {', '.join(PARALLEL)}"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.micro_batch_size is None or cfg.train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (cfg.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.max_length >= 16, "train.max_length must be >= 16"),
        (cfg.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (0 < cfg.eval.automation_precision <= 1, "eval.automation_precision must be in (0, 1]"),
        (cfg.memory.per_task >= 0 and cfg.memory.per_batch >= 0, "memory sizes must be >= 0"),
        (cfg.adversarial.weight >= 0, "adversarial.weight must be >= 0"),
        (cfg.adversarial.lr is None or cfg.adversarial.lr > 0, "adversarial.lr must be > 0"),
        (cfg.adversarial.inner_steps >= 1 and cfg.adversarial.ramp_steps >= 0,
         "adversarial.inner_steps must be >= 1 and adversarial.ramp_steps >= 0"),
        (cfg.retention.distill >= 0 and cfg.retention.shared_l2 >= 0, "retention weights must be >= 0"),
        (cfg.retention.shared in ("snapshot", "live"), "retention.shared must be 'snapshot' or 'live'"),
        (cfg.router.fit_per_task >= 0, "router.fit_per_task must be >= 0"),
        (cfg.router.calibrate_per_task >= 0, "router.calibrate_per_task must be >= 0"),
        (0 < cfg.router.accept_quantile <= 1, "router.accept_quantile must be in (0, 1]"),
        (not (cfg.head == "classifier" and REGISTRY[cfg.method].shared_expert_with_gate and cfg.retention.distill > 0),
         "retention.distill distils answer tokens and needs head 'lm'; set it to 0 with head 'classifier'"),
        (not (cfg.eval.routing and cfg.router.fit_per_task == 0), "eval.routing needs router.fit_per_task > 0"),
        (not (cfg.eval.forward_transfer and cfg.head == "classifier"),
         "eval.forward_transfer needs head 'lm': an untrained classifier head has no baseline accuracy"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return config_from_dict(raw, source=str(path), base_dir=path.parent.resolve())
