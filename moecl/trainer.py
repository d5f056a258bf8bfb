"""One trainer for every method: tasks in order, an evaluation row after each, a checkpoint after each.

Each stage reseeds from (seed, stage index) and rebuilds its batches and memory from the data, so a
run resumed from the checkpoint after stage k takes exactly the steps an uninterrupted run takes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .answer_keys import ANSWERS_FILE, examples_key, model_key
from .backbone import load_backbone, resolve_device, resolve_precision
from .checkpoint import load_adapters, save_checkpoint
from .config import Config
from .data import Example, TaskData, load_task, per_label
from .distributed import World, join, process_device, shard_backbone
from .manifest import checkpoint_dir, read_manifest
from .methods import REGISTRY
from .metrics import plot_heatmap, stage_tasks, summarise
from .model import IGNORE, ContinualModel, balanced_weights
from .prompts import TaskPrompt
from .scoring import predict, rank_labels
from .task_router import MIN_HELD_OUT, route, text_features

log = logging.getLogger("moecl")
LOG_EVERY = 10
STEP_CHECKPOINT = "checkpoint-step"
TRAINER_STATE = "trainer_state.pt"
STATS = ("loss", "distill", "disc_loss", "disc_acc", "shared_drift", "ortho")


class ResumeError(RuntimeError):
    """The run folder holds a checkpoint that this config cannot continue (or must not overwrite)."""


@dataclass
class MemoryRow:
    """A finished task's input kept for the current stage. In moecl its `example.label` is the model's
    own answer before the stage and `teacher` that answer's next-token log-probabilities (the
    distillation target); in replay it is the gold example, rehearsed as is."""
    example: Example
    teacher: torch.Tensor | None = None  # (answer tokens, vocabulary)


@dataclass
class BatchScale:
    """Sizes of one whole global batch. Every process sums the losses of its share of the batch and
    divides by these, so gradients summed over processes and micro-batches equal one pass over the
    whole batch, however it is split."""
    answers: int  # answer tokens (lm head) or labelled rows (classifier head) carrying the task loss
    distilled: int  # answer positions of the memory rows that carry a teacher
    disc_weight: dict[str, float]  # a row's discriminator weight by its task, balanced over the batch


class BatchLoss(nn.Module):
    """What DDP wraps: the model, and the trainer's loss of one micro-batch as its forward."""

    def __init__(self, model: ContinualModel, loss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *args):
        return self.loss(*args)


def router_texts(train: list[Example], fit: int, calibrate: int, max_per_label: int | None,
                 seed: int) -> tuple[list[str], list[str]]:
    """(texts that describe a task to the router: its training examples as the model drew them;
    other texts of it that set its acceptance distance). A split with too few spare rows lends at
    most a fifth of the describing texts to the held-out ones."""
    chosen = per_label(train, max_per_label, seed)[:fit]
    used = {id(e) for e in chosen}
    held = [e for e in per_label(train, None, seed) if id(e) not in used][:calibrate]
    lent = min(calibrate - len(held), len(chosen) // 5)
    if lent > 0:
        chosen, held = chosen[:-lent], held + chosen[-lent:]
    return [e.text for e in chosen], [e.text for e in held]


@dataclass
class Progress:
    """What the run has produced so far; stored in the manifest so a resumed run continues it."""
    matrix: list[list[float]] = field(default_factory=list)
    before_training: list[float] = field(default_factory=list)
    baseline: list[float] | None = None
    routing_accuracy: dict[str, float] | None = None
    training: list[dict] = field(default_factory=list)  # per stage: its name, steps and mean step stats
    curve: list[dict] = field(default_factory=list)  # per optimizer step: stage, step, lr and its stats


def load_tasks(cfg: Config) -> list[TaskData]:
    return [load_task(t.name, t.data) for t in cfg.tasks]


def build_prompts(cfg: Config, tokenizer, tasks: list[TaskData]) -> dict[str, TaskPrompt]:
    instructions = {t.name: t.instruction for t in cfg.tasks}
    prompts = {t.name: TaskPrompt(tokenizer, t.name, t.labels, cfg.train.max_length, instructions[t.name]) for t in tasks}
    for prompt in prompts.values():
        prompt.prompt("")  # fail now, not mid-run, if an instruction leaves no room for text
    return prompts


def stages(cfg: Config, tasks: list[TaskData]) -> list[list[TaskData]]:
    """Multi-task learning trains all tasks in one stage; every other method one task per stage."""
    return [tasks] if REGISTRY[cfg.method].joint else [[t] for t in tasks]


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, model: ContinualModel | None = None):
        self.cfg = cfg
        self.method = REGISTRY[cfg.method]
        self.run_dir = Path(run_dir)
        self.tasks = load_tasks(cfg)  # all data is checked before the backbone is even loaded
        self.task_data = {t.name: t for t in self.tasks}
        self.world: World = join(cfg.train.device)
        if model is None:
            device = process_device(cfg.train.device, self.world)
            cfg.train.precision = resolve_precision(cfg.train.precision, resolve_device(device))  # what runs is recorded
            backbone, tokenizer = load_backbone(cfg.backbone, device, cfg.train.precision)
            model = ContinualModel(backbone, tokenizer, cfg.method, cfg.lora, cfg.head, cfg.train.precision)
        self.model = model
        if cfg.train.gradient_checkpointing:
            # Non-reentrant: the frozen embeddings' outputs need no gradient, and dropout masks are replayed.
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.parallel == "fsdp" and self.world.distributed:
            shard_backbone(model, self.world)
        self.prompts = build_prompts(cfg, model.tokenizer, self.tasks)
        self.test_sets = {t.name: per_label(t.test, cfg.eval.max_per_label, cfg.train.seed) for t in self.tasks}
        self.progress = Progress()
        self.scored: dict[tuple[str, str], dict] = {}  # answer keys (model, data) -> that scoring: see evaluate
        self._examples_keys = {t.name: examples_key(t.name, t.labels, self.test_sets[t.name], cfg) for t in self.tasks}
        self.reused = 0  # evaluations answered from `scored`
        self.resuming = False  # run(resume=True): a mid-stage checkpoint of the next stage is continued
        self._lambda_now = self._adversarial_weight  # this step's λ (raised over adversarial.ramp_steps)
        self.scoring_seconds = 0.0  # spent scoring test sets and routing (the run's evaluation cost)
        self._disc_views: list[tuple] = []  # this step's discriminator inputs, labels, row weights
        self.on_checkpoint: Callable[[Path], None] | None = None  # called with each checkpoint written (rank 0)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, task: TaskData) -> float:
        """Accuracy on the task's test set; each process scores its share and the hits are summed.
        With `eval.reuse`, an accuracy is reused while the keys of its answers (moecl.answer_keys:
        the tensors they read, the test set, scoring settings and code) are unchanged: within the
        run, and from the answers saved with a checkpoint it continues. The bare backbone (forward
        transfer's baseline) is scored before the model holds the task at all."""
        key = self._answer_key(task)
        if self.cfg.eval.reuse and key in self.scored:
            self.reused += 1
        else:
            self.scored[key] = self._score(task)
        return self.scored[key]["accuracy"]

    def _answer_key(self, task: TaskData) -> tuple[str, str]:
        return model_key(self.model, task.name, task.labels), self._examples_keys[task.name]

    def _score(self, task: TaskData) -> dict:
        """{"accuracy"} and, in one process (whose batches are the evaluate step's), the per-example
        "correct" and "margins" that are saved with the checkpoint."""
        started = time.perf_counter()
        examples = self.test_sets[task.name]
        mine, real = self.world.even_shard(examples)
        predicted, sure = rank_labels(self.model, self.prompts[task.name], [e.text for e in mine],
                                      self.cfg.eval.batch_size, progress=self.world.main)
        correct = [p == e.label for p, e in zip(predicted[:real], mine)]
        [hits] = self.world.sum([sum(correct)])
        self.scoring_seconds += time.perf_counter() - started
        entry = {"accuracy": hits / len(examples)}
        return entry if self.world.distributed else {**entry, "correct": correct, "margins": sure[:real]}

    def _current_answers(self) -> dict[str, dict]:
        """Per task of the model, its per-example answers as the model is now, when this run has them."""
        answers = {}
        for name in self.model.tasks:
            key = self._answer_key(self.task_data[name])
            entry = self.scored.get(key, {})
            if "correct" in entry:
                answers[name] = {"model": key[0], "data": key[1], "correct": entry["correct"], "margins": entry["margins"]}
        return answers

    def _baseline(self) -> list[float]:
        """Accuracy of the bare backbone on every task (adapters bypassed), for forward transfer."""
        self.model.routing.bypass = True
        try:
            return [self.evaluate(t) for t in self.tasks]
        finally:
            self.model.routing.bypass = False

    # -- training -----------------------------------------------------------------------------
    @property
    def _moecl(self) -> bool:
        return self.method.shared_expert_with_gate

    @property
    def _adversarial_weight(self) -> float:
        return self.cfg.adversarial.weight if self.method.adversarial else 0.0

    def _memory(self, past: list[TaskData]) -> list[MemoryRow]:
        """A few inputs of every finished task, spread over its labels, for a method with a memory
        (methods.py): rehearsed with their gold answers, or probed (read by the discriminator,
        distilled toward the model's own answers). moecl-nogan probes too, whatever λ: the
        ablation differs from moecl by the adversarial term alone, not by its batches and draws."""
        cfg = self.cfg
        size = cfg.memory.per_task
        wanted = self.method.memory != "none"
        if size == 0 or not past or not wanted:
            return []
        pool = [e for task in past for e in per_label(task.train, max(1, size // len(task.labels)), cfg.train.seed)[:size]]
        rows = [MemoryRow(e) for e in pool]
        if self.method.memory == "probe" and cfg.retention.distill > 0:
            self._attach_teacher(rows)
        return rows

    @torch.no_grad()
    def _attach_teacher(self, rows: list[MemoryRow]) -> None:
        """Replace each row's label by the current model's answer and record that answer's
        next-token log-probabilities: the targets that keep old tasks' outputs in place."""
        model, size = self.model, self.cfg.eval.batch_size
        for task in dict.fromkeys(r.example.task for r in rows):
            mine = [r for r in rows if r.example.task == task]
            answers = predict(model, self.prompts[task], [r.example.text for r in mine], size)
            for row, answer in zip(mine, answers):
                row.example = Example(row.example.text, answer, task)
        was_training = model.training
        model.eval()
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            input_ids, mask, labels, _, _ = self._batch([r.example for r in chunk], supervised=len(chunk))
            model.route([r.example.task for r in chunk])
            keep = labels[:, 1:] != IGNORE
            with model.autocast():
                hidden = model.hidden_states(input_ids, mask)[:, :-1]
                log_probs = F.log_softmax(model.vocabulary_logits(hidden[keep]), dim=-1)
            for row, part in zip(chunk, log_probs.split(keep.sum(1).tolist())):
                row.teacher = part
        model.train(was_training)

    def _batch(self, rows: list[Example], supervised: int):
        """Right-padded tensors: ids, attention mask, answer labels, class labels and the text mask.
        Rows past `supervised` are memory rows: they carry answer labels only in replay."""
        rehearse = self.method.memory == "rehearse"
        ids, labels, class_labels, text_lengths = [], [], [], []
        for i, example in enumerate(rows):
            prompt = self.prompts[example.task]
            with_answer = i < supervised or rehearse
            if self.model.head == "lm":
                encoded = prompt.training_pair(example)
                seq, text_length = encoded.ids, encoded.text_length
                labels.append(encoded.labels if with_answer else [IGNORE] * len(seq))
            else:
                text_ids = prompt.text_ids(example.text)
                seq, text_length = text_ids + prompt.suffix, len(text_ids)
            ids.append(seq)
            text_lengths.append(text_length)
            class_labels.append(example.label if with_answer else IGNORE)
        width = max(map(len, ids))
        device = self.model.device
        pad = self.model.tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=device)
        text_mask = (torch.arange(width, device=device) < torch.tensor(text_lengths, device=device)[:, None]).long()
        lm_labels = torch.tensor([s + [IGNORE] * (width - len(s)) for s in labels], device=device) if labels else None
        return input_ids, mask, lm_labels, torch.tensor(class_labels, device=device), text_mask

    def _distill_mask(self, memory_rows: list[MemoryRow], mask: torch.Tensor, supervised: int) -> torch.Tensor:
        """(batch, width) True on the positions whose next token is a memory row's (teacher) answer:
        the answer closes each right-padded sequence."""
        positions = torch.zeros_like(mask, dtype=torch.bool)
        lengths = mask.sum(1).tolist()
        for i, row in enumerate(memory_rows, start=supervised):
            answer = len(self.prompts[row.example.task].answers[row.example.label])
            positions[i, lengths[i] - answer - 1: lengths[i] - 1] = True
        return positions

    def _batch_scale(self, rows: list[Example], memory_rows: list[MemoryRow]) -> BatchScale:
        prompts = self.prompts
        supervised = rows + ([r.example for r in memory_rows] if self.method.memory == "rehearse" else [])
        answers = (sum(len(prompts[e.task].answers[e.label]) for e in supervised) if self.model.head == "lm"
                   else len(supervised))
        distilled = sum(len(prompts[r.example.task].answers[r.example.label]) for r in memory_rows if r.teacher is not None)
        tasks = [e.task for e in rows] + [r.example.task for r in memory_rows]
        weights = balanced_weights(torch.tensor([self.model.tasks.index(t) for t in tasks]))
        return BatchScale(answers, distilled, dict(zip(tasks, weights.tolist())))

    def _step_loss(self, rows: list[Example], memory_rows: list[MemoryRow], stage_task: str,
                   anchor: dict[str, torch.Tensor], scale: BatchScale | None = None,
                   whole_model_terms: bool = True) -> tuple[torch.Tensor, dict]:
        """The loss of these rows as a share of a batch `scale` describes (None: they are the whole batch)."""
        with self.model.autocast():
            return self._forward_loss(rows, memory_rows, stage_task, anchor,
                                      scale or self._batch_scale(rows, memory_rows), whole_model_terms)

    def _forward_loss(self, rows: list[Example], memory_rows: list[MemoryRow], stage_task: str,
                      anchor: dict[str, torch.Tensor], scale: BatchScale,
                      whole_model_terms: bool) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the batch loss (see BatchScale). Terms of the whole model
        rather than of rows (the shared expert's drift, O-LoRA's orthogonality) are added once per
        batch, by the pass given `whole_model_terms`."""
        model, cfg = self.model, self.cfg
        supervised = len(rows)
        rows = rows + [r.example for r in memory_rows]
        input_ids, mask, lm_labels, class_labels, text_mask = self._batch(rows, supervised)
        tasks = [e.task for e in rows]
        model.route(tasks, text_mask=text_mask, adversarial_weight=self._lambda_now)
        stats = {}
        if model.head == "lm":
            hidden = model.hidden_states(input_ids, mask)[:, :-1]
            targets = lm_labels[:, 1:]
            keep = targets != IGNORE
            loss = F.cross_entropy(model.vocabulary_logits(hidden[keep]), targets[keep], reduction="sum") / scale.answers
            stats["loss"] = loss.item()
            teachers = [r.teacher for r in memory_rows if r.teacher is not None]
            if teachers:
                positions = self._distill_mask(memory_rows, mask, supervised)[:, :-1]
                student = F.log_softmax(model.vocabulary_logits(hidden[positions]), dim=-1)
                teacher = torch.cat(teachers)
                distill = (teacher.exp() * (teacher - student)).sum() / scale.distilled
                loss = loss + cfg.retention.distill * distill
                stats["distill"] = distill.item()
        else:
            loss = model.classifier_loss(input_ids, mask, tasks, class_labels, total=scale.answers)
            stats["loss"] = loss.item()
        if model.routing.disc_labels is not None:
            # Gradient reversal inside the model turns +disc_loss into -weight * disc_loss for the
            # shared expert, while the discriminator itself still descends on disc_loss.
            row_weight = torch.tensor([scale.disc_weight[t] for t in tasks], device=model.device)
            disc_loss, disc_acc = model.discriminator_loss(row_weight)
            loss = loss + disc_loss
            self._disc_views.append((model.routing.disc_inputs, model.routing.disc_labels, row_weight))
            stats.update(disc_loss=disc_loss.item() / len(model.routing.disc_inputs), disc_acc=disc_acc)
        if anchor and whole_model_terms:
            drift = sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)
            loss = loss + cfg.retention.shared_l2 * drift
            stats["shared_drift"] = drift.item()
        if self.method.orthogonality and model.tasks.index(stage_task) > 0 and whole_model_terms:
            ortho = model.orthogonality_loss(stage_task)
            loss = loss + cfg.olora.weight * ortho
            stats["ortho"] = ortho.item()
        return loss, stats

    def _data_parallel(self, stage: list[TaskData]) -> nn.Module:
        """The stage's loss module, wrapped in DDP when torchrun started several processes. Built
        per stage, after the stage's experts exist and the trainable set is fixed; the trainable
        tensors are broadcast from rank 0, the frozen backbone (the same file everywhere) is not.
        Under FSDP it stays unwrapped: `_accumulate` averages the adapters' gradients itself."""
        step_loss = BatchLoss(self.model, self._step_loss)
        if not self.world.distributed or self.cfg.train.parallel == "fsdp":
            return step_loss
        frozen = [name for name, param in step_loss.named_parameters() if not param.requires_grad]
        buffers = [name for name, _ in step_loss.named_buffers()]  # e.g. rotary frequencies: computed alike everywhere
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_loss, frozen + buffers)
        # A multi-task batch need not hold every task's head; every other trainable tensor is used by every pass.
        return DistributedDataParallel(step_loss, find_unused_parameters=self.model.head == "classifier" and len(stage) > 1)

    def _discriminator_steps(self, optimizer, step_loss: nn.Module) -> None:
        """adversarial.inner_steps - 1 more steps of the discriminators alone, on what they read in
        this step's forward passes (every micro-batch, every process: gradients summed as in the
        joint step). Only the discriminators get gradients, so only they move."""
        if not self._disc_views:
            return
        judges = optimizer.param_groups[-1]["params"]  # the discriminators' group (train_stage)
        ddp = isinstance(step_loss, DistributedDataParallel)
        for _ in range(self.cfg.adversarial.inner_steps - 1):
            optimizer.zero_grad(set_to_none=True)
            with step_loss.no_sync() if ddp else contextlib.nullcontext():
                loss = sum(self.model.rediscriminate(inputs, labels, weight)[0] for inputs, labels, weight in self._disc_views)
                (loss * self.world.size).backward()
            self.world.average_gradients(judges)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._disc_views = []

    def _accumulate(self, step_loss: nn.Module, scaler, rows: list[Example], memory_rows: list[MemoryRow],
                    stage_task: str, anchor: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward and backward this process's share of one global batch, `micro_batch_size` rows
        per pass; DDP sums the gradients over processes on the last backward. Returns the batch's
        step statistics, summed over every process."""
        world = self.world
        scale = self._batch_scale(rows, memory_rows)
        mine = world.shard(rows)
        active = min(world.size, len(rows))
        memory = memory_rows[world.rank::active] if mine else []
        micro = self.cfg.train.micro_batch_size or -(-len(rows) // world.size)
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        real = len(chunks)
        # Every process makes as many passes as the one with the largest share (rank 0's): a process
        # short of rows passes a row with weight 0, adding nothing to the gradient sum.
        passes = -(-len(rows[0::world.size]) // micro)
        chunks += [rows[:1]] * (passes - real)
        ddp = isinstance(step_loss, DistributedDataParallel)
        totals = [0.0] * (2 * len(STATS))  # sums, then how many passes reported each statistic
        for k, chunk in enumerate(chunks):
            weight = float(world.size) if k < real else 0.0  # DDP averages over processes
            views = len(self._disc_views)
            with step_loss.no_sync() if ddp and k < passes - 1 else contextlib.nullcontext():
                loss, stats = step_loss(chunk, memory[k::real] if weight else [], stage_task, anchor, scale,
                                        world.main and k == 0)
                scaler.scale(loss * weight).backward()
            if not weight:
                del self._disc_views[views:]  # a padding pass: its row adds nothing to the discriminator steps either
            for i, key in enumerate(STATS):
                if key in stats and weight:
                    totals[i] += stats[key]
                    totals[len(STATS) + i] += 1
        if world.distributed and not ddp:
            world.average_gradients([p for p in self.model.parameters() if p.requires_grad])
        totals = world.sum(totals)
        return {key: totals[i] for i, key in enumerate(STATS) if totals[len(STATS) + i]}

    def _batches(self, examples: list[Example], memory: list[MemoryRow], rng: random.Random):
        """The stage's (rows, memory rows) per optimizer step, in an order fixed by the stage's seed."""
        size, per_batch = self.cfg.train.batch_size, self.cfg.memory.per_batch
        for _ in range(self.cfg.train.epochs):
            rng.shuffle(examples)
            for start in range(0, len(examples), size):
                yield examples[start:start + size], (rng.sample(memory, min(per_batch, len(memory))) if memory else [])

    def _save_within_stage(self, index: int, step: int, totals: dict, optimizer, scaler) -> None:
        """A mid-stage checkpoint: adapters, optimizer, loss scaler and RNG state after `step` steps."""
        if self.world.main:
            state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            manifest = {**self._manifest(), "step_state": {"stage_index": index, "step": step, "totals": totals}}
            folder = save_checkpoint(self.model, self.run_dir, manifest, STEP_CHECKPOINT, extra={TRAINER_STATE: state})
            if self.on_checkpoint:
                self.on_checkpoint(folder)
        self.world.barrier()

    def _resume_within_stage(self, index: int, optimizer, scaler) -> tuple[int, dict[str, float]]:
        """(steps done, their stat totals): from this stage's mid-stage checkpoint when resuming, else (0, {})."""
        folder = self.run_dir / STEP_CHECKPOINT
        if not self.resuming or not (folder / "manifest.json").is_file():
            return 0, {}
        manifest = read_manifest(folder)
        state = manifest["step_state"]
        if state["stage_index"] != index or manifest["tasks"] != self.model.tasks:
            return 0, {}
        load_adapters(self.model, manifest)
        saved = torch.load(folder / TRAINER_STATE, weights_only=True)  # it may come from a run's artifacts: data only
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.progress.curve = manifest["progress"]["curve"]
        log.info("resuming stage %d after step %d", index + 1, state["step"])
        return state["step"], state["totals"]

    def train_stage(self, stage: list[TaskData], past: list[TaskData], index: int) -> None:
        cfg, model = self.cfg, self.model
        rng = random.Random(cfg.train.seed * 1000 + index)
        examples = [e for t in stage for e in per_label(t.train, cfg.train.max_per_label, cfg.train.seed)]
        for task in stage:  # a task trained again (its data changed) learns with the live shared expert
            model.release_snapshot(task.name)
        memory = self._memory(past)
        params = model.prepare_training([t.name for t in stage], discriminators=self._adversarial_weight > 0 and bool(past))
        anchor = ({n: p.detach().clone() for n, p in model.named_parameters() if ".experts.shared." in n}
                  if self._moecl and past and cfg.retention.shared_l2 > 0 else {})
        step_loss = self._data_parallel(stage)
        judges = {id(p) for m in model.ffn_modules() if m.discriminator is not None for p in m.discriminator.parameters()}
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if id(p) not in judges]},
             {"params": [p for p in params if id(p) in judges], "lr": cfg.adversarial.lr or cfg.train.lr}],
            lr=cfg.train.lr, weight_decay=0.0)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler(model.device.type, enabled=cfg.train.precision == "fp16")
        name = "+".join(t.name for t in stage)
        steps = cfg.train.epochs * ((len(examples) + cfg.train.batch_size - 1) // cfg.train.batch_size)
        model.train()
        step, totals = self._resume_within_stage(index, optimizer, scaler)
        bar = tqdm(total=steps, initial=step, desc=f"train {name}", leave=False, disable=not self.world.main)
        for number, (rows, memory_rows) in enumerate(self._batches(examples, memory, rng), start=1):
            if number <= step:
                continue  # a resumed stage replays the data order up to where it stopped
            optimizer.zero_grad(set_to_none=True)
            ramp = cfg.adversarial.ramp_steps
            self._lambda_now = self._adversarial_weight * (min(1.0, (step + 1) / ramp) if ramp else 1.0)
            self._disc_views = []
            stats = self._accumulate(step_loss, scaler, rows, memory_rows, stage[-1].name, anchor)
            if cfg.train.max_grad_norm:
                scaler.unscale_(optimizer)
                # Adapters and discriminators apart: a sharp discriminator's gradient must not throttle the task's.
                for group in optimizer.param_groups:
                    torch.nn.utils.clip_grad_norm_(group["params"], cfg.train.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            self._discriminator_steps(optimizer, step_loss)
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            self.progress.curve.append({"stage": name, "step": step, "lr": optimizer.param_groups[0]["lr"],
                                        **{k: round(v, 6) for k, v in stats.items()}})
            if step % LOG_EVERY == 0 or step == steps:
                log.info("task=%s step=%d/%d %s", name, step, steps, " ".join(f"{k}={v:.4f}" for k, v in stats.items()))
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < steps:
                self._save_within_stage(index, step, totals, optimizer, scaler)
        bar.close()
        model.eval()
        self.progress.training.append({"stage": name, "steps": steps, **{k: v / steps for k, v in totals.items()}})
        if self._moecl and cfg.retention.shared == "snapshot":
            for task in stage:
                model.snapshot_shared(task.name)
        if cfg.router.fit_per_task:
            for task in stage:
                fit, held = router_texts(task.train, cfg.router.fit_per_task, cfg.router.calibrate_per_task,
                                         cfg.train.max_per_label, cfg.train.seed)
                if cfg.router.calibrate_per_task and len(held) < MIN_HELD_OUT:
                    log.warning("router: %s has %d texts to spare, fewer than %d: it will refuse no text routed to it",
                                task.name, len(held), MIN_HELD_OUT)
                features = text_features(model, fit + held, cfg.train.max_length, cfg.eval.batch_size)
                model.task_router.fit(task.name, features[: len(fit)], features[len(fit):],
                                      cfg.router.accept_quantile)
                model.task_router.fit_layouts(task.name, fit, held, cfg.router.accept_quantile)

    def routing_accuracy(self) -> dict[str, float]:
        """Per task: the share of its test texts the task-free router sends back to it (each process
        routes its share)."""
        result, started = {}, time.perf_counter()
        for name in self.model.tasks:
            texts = [e.text for e in self.test_sets[name]]
            mine, real = self.world.even_shard(texts)
            routed = route(self.model, mine, self.cfg.train.max_length, self.cfg.eval.batch_size)
            [hits] = self.world.sum([sum(r == name for r in routed[:real])])
            result[name] = hits / len(texts)
        self.scoring_seconds += time.perf_counter() - started
        return result

    # -- the run ------------------------------------------------------------------------------
    def _manifest(self) -> dict:
        known = [self.task_data[name] for name in self.model.tasks]
        return {
            "backbone": self.cfg.backbone,
            "method": self.cfg.method,
            "head": self.cfg.head,
            "config": self.cfg.to_dict(),
            "tasks": self.model.tasks,
            "labels": {t.name: t.labels for t in known},
            "instructions": {t.name: self.prompts[t.name].instruction for t in known},
            "max_length": self.cfg.train.max_length,
            "data_hashes": {t.name: t.version for t in known},
            "progress": vars(self.progress),
        }

    def _load(self, manifest: dict) -> None:
        for name in manifest["tasks"]:
            self.model.add_task(name, manifest["labels"][name])
        load_adapters(self.model, manifest)
        self.progress = Progress(**manifest["progress"])
        answers = Path(manifest["path"]) / ANSWERS_FILE  # what the checkpoint's own run scored
        for entry in json.loads(answers.read_text()).values() if answers.is_file() else []:
            correct = entry["correct"]
            self.scored[entry["model"], entry["data"]] = {"accuracy": sum(correct) / len(correct), "correct": correct,
                                                          "margins": entry["margins"]}

    def _restore(self, plan: list[list[TaskData]]) -> int:
        """Load the last complete stage's checkpoint; return how many stages it covers."""
        manifest = read_manifest(checkpoint_dir(self.run_dir))
        done = manifest["tasks"]
        expected = [t.name for stage in plan for t in stage][: len(done)]
        if manifest["method"] != self.cfg.method or manifest["backbone"] != self.cfg.backbone or done != expected:
            raise ResumeError(f"{self.run_dir}: its checkpoint ({manifest['method']}, {manifest['backbone']}, tasks {done}) "
                              f"is not a prefix of this config's run")
        for task in self.tasks[: len(done)]:
            if manifest["data_hashes"][task.name] != task.version:
                raise ResumeError(f"{task.folder}: data changed since the checkpoint was written; start a new run")
        self._load(manifest)
        return len(self.progress.matrix)

    def run(self, resume: bool = False) -> dict:
        """Train every task of the config in order (continuing a checkpoint in the run folder with --resume)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        plan = stages(self.cfg, self.tasks)
        has_checkpoint = (checkpoint_dir(self.run_dir) / "manifest.json").is_file()
        if has_checkpoint and not resume:
            raise ResumeError(f"{self.run_dir} already holds a checkpoint: pass --resume to continue it, or use a new --out")
        first = self._restore(plan) if resume and has_checkpoint else 0
        self.resuming = resume
        return self._run_plan(plan[first:])

    def extend(self, manifest: dict, plan: list[list[TaskData]] | None = None) -> dict:
        """Continue a trained model (e.g. the registry's champion) with more stages: new tasks get
        their own expert; a task it already knows continues training its existing expert (with its
        new label set, when the validation settings let that change). Without
        a plan: every task of the config that the model lacks or whose data changed since, in
        config order."""
        missing = [t for t in manifest["tasks"] if t not in self.task_data]
        if missing:
            raise ResumeError(f"{manifest['path']}: the model knows tasks {missing} that the config does not list")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._load(manifest)
        for name in manifest["tasks"]:  # a label set the validation settings let change
            self.model.relabel(name, self.task_data[name].labels)
        if plan is None:
            known = manifest["data_hashes"]
            plan = [[t] for t in self.tasks if known.get(t.name) != t.version]
        return self._run_plan(plan)

    def _run_plan(self, plan: list[list[TaskData]]) -> dict:
        cfg, model = self.cfg, self.model
        if cfg.eval.forward_transfer and self.progress.baseline is None:
            self.progress.baseline = self._baseline()
        started = time.time()
        for number, stage in enumerate(plan, start=1):
            index = len(self.progress.matrix)  # stages done so far: seeds match however the run was split
            torch.manual_seed(cfg.train.seed * 1000 + index)
            for task in stage:
                if task.name not in model.tasks:
                    model.add_task(task.name, task.labels)
            if cfg.eval.forward_transfer:
                self.progress.before_training.append(self.evaluate(stage[0]))
            names = {t.name for t in stage}
            past = [self.task_data[n] for n in model.tasks if n not in names]
            self.train_stage(stage, past, index)
            wanted = cfg.eval.every_stage or number == len(plan)
            row = [self.evaluate(self.task_data[n]) if wanted or n in names else None for n in model.tasks]
            self.progress.matrix.append(row)
            if number == len(plan) and cfg.eval.routing:
                self.progress.routing_accuracy = self.routing_accuracy()
            log.info("after %s: %s", "+".join(names),
                     " ".join(f"{n}={a:.3f}" for n, a in zip(model.tasks, row) if a is not None))
            if self.world.main:
                folder = save_checkpoint(model, self.run_dir, self._manifest(),
                                         texts={ANSWERS_FILE: json.dumps(self._current_answers())})
                shutil.rmtree(self.run_dir / STEP_CHECKPOINT, ignore_errors=True)  # the stage is whole now
                if self.on_checkpoint:
                    self.on_checkpoint(folder)
            self.world.barrier()  # no process reads ahead of a checkpoint that is still being written
        return self._finish(time.time() - started)

    def _finish(self, seconds: float) -> dict:
        names = list(self.model.tasks)
        progress = self.progress
        fwt_inputs = (progress.before_training, progress.baseline) if self.cfg.eval.forward_transfer else (None, None)
        metrics = summarise(names, progress.matrix, *fwt_inputs, stages=stage_tasks(progress.training, progress.matrix))
        metrics.update(method=self.cfg.method, precision=self.cfg.train.precision, chance={n: self.task_data[n].chance for n in names},
                       routing_accuracy=progress.routing_accuracy, training=progress.training,
                       train_seconds=round(seconds, 1), scoring_seconds=round(self.scoring_seconds, 1))
        if self.world.main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            stages = [s["stage"] for s in progress.training] if len(progress.training) == len(progress.matrix) else None
            plot_heatmap(names, progress.matrix, self.run_dir / "heatmap.png",
                         f"{self.cfg.method}: accuracy after each task", stages)
        return metrics
