"""Prediction: the model picks one of a task's labels; a text without a task is routed to one first.

In LM mode every label string is ranked by its log-likelihood after the prompt. The prompt is
encoded once per example; its key/value cache is then shared by all of the task's labels, which
are scored together in one batched continuation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Example
from .model import ContinualModel
from .prompts import TaskPrompt
from .task_router import text_features


def _pad(rows: list[list[int]], value: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long, device=device)
        mask[i, span] = 1
    return ids, mask


@torch.no_grad()
def label_log_likelihoods(model: ContinualModel, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """(len(prompts), len(answers)) summed log-probabilities of each answer after each prompt."""
    backbone, device = model.backbone, model.device
    pad = model.tokenizer.pad_token_id
    ids, mask = _pad(prompts, pad, left=True, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    answer_ids, answer_mask = _pad(answers, pad, left=False, device=device)
    scores = F.log_softmax(out.logits[:, -1].float(), dim=-1)[:, answer_ids[:, 0]]  # first answer token
    if answer_ids.shape[1] == 1:
        return scores
    n_prompts, n_answers = len(prompts), len(answers)
    cache = out.cache
    cache.batch_repeat_interleave(n_answers)  # row p * n_answers + a continues prompt p with answer a
    inputs = answer_ids[:, :-1].repeat(n_prompts, 1)
    inputs_mask = answer_mask[:, 1:].repeat(n_prompts, 1)
    lengths = mask.sum(-1).repeat_interleave(n_answers)
    cont = backbone(
        input_ids=inputs,
        attention_mask=torch.cat([mask.repeat_interleave(n_answers, 0), inputs_mask], dim=1),
        position_ids=lengths[:, None] + torch.arange(inputs.shape[1], device=device),
        cache=cache,
    )
    targets = answer_ids[:, 1:].repeat(n_prompts, 1)
    token_lp = F.log_softmax(cont.logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rest = (token_lp * inputs_mask).sum(-1).view(n_prompts, n_answers)
    return scores + rest


@torch.no_grad()
def predict(model: ContinualModel, prompt: TaskPrompt, texts: list[str], batch_size: int,
            progress: bool = False) -> list[int]:
    """Predicted label index per text for the prompt's task."""
    return label_scores(model, prompt, texts, batch_size, progress).argmax(-1).tolist()


def margins(scores: torch.Tensor) -> list[float]:
    """Per row, how far the best label's score is ahead of the runner-up's: how sure the answer is."""
    if scores.shape[-1] < 2:
        return [float("inf")] * scores.shape[0]
    top = scores.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


@torch.no_grad()
def label_scores(model: ContinualModel, prompt: TaskPrompt, texts: list[str], batch_size: int,
                 progress: bool = False) -> torch.Tensor:
    """(texts, labels) scores for the prompt's task: label log-likelihoods (LM head) or logits."""
    was_training = model.training
    model.eval()
    task = prompt.task
    # Keep (prompts x labels) rows per continuation call bounded, whatever the label count.
    step = max(1, batch_size if model.head == "classifier" else (batch_size * 4) // len(prompt.answers))
    scores: list[torch.Tensor] = []
    try:
        for start in tqdm(range(0, len(texts), step), desc=f"eval {task}", disable=not progress, leave=False):
            chunk = [prompt.prompt(t) for t in texts[start:start + step]]
            model.route([task] * len(chunk))
            with model.autocast():
                if model.head == "classifier":
                    ids, mask = _pad(chunk, model.tokenizer.pad_token_id, left=False, device=model.device)
                    batch_scores = model.class_logits(ids, mask, task)
                else:
                    batch_scores = label_log_likelihoods(model, chunk, prompt.answers)
            scores.append(batch_scores.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores) if scores else torch.empty(0, len(prompt.labels))


def accuracy(model: ContinualModel, prompt: TaskPrompt, examples: list[Example], batch_size: int,
             progress: bool = False) -> float:
    predicted = predict(model, prompt, [e.text for e in examples], batch_size, progress)
    return sum(p == e.label for p, e in zip(predicted, examples)) / len(examples)


def answer(model: ContinualModel, prompts: dict[str, TaskPrompt], texts: list[str], tasks: list[str | None],
           batch_size: int = 8) -> list[tuple[str, str]]:
    """(task, label) per text. A text without a task (None or "") is routed to one by the model's
    task-free router first; then each task's texts are scored together against its labels."""
    unknown = sorted({t for t in tasks if t and t not in prompts})
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; this model knows {sorted(prompts)}")
    tasks = list(tasks)
    untold = [i for i, t in enumerate(tasks) if not t]
    if untold:
        budget = max(p.max_length for p in prompts.values())
        routed = model.task_router.predict(text_features(model, [texts[i] for i in untold], budget, batch_size))
        for i, task in zip(untold, routed):
            tasks[i] = task
    result: list[tuple[str, str]] = [("", "")] * len(texts)
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        prompt = prompts[task]
        for i, index in zip(rows, predict(model, prompt, [texts[i] for i in rows], batch_size)):
            result[i] = (task, prompt.labels[index])
    return result
