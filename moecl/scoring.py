"""Prediction: the model picks one of a task's labels; a text without a task is routed to one first.

In LM mode every label string is ranked by its log-likelihood after the prompt. The prompt is
encoded once per example; its key/value cache is then shared by all of the task's labels, which
are scored together in one batched continuation. A batch may mix tasks: each row is read through
its own task's experts and continued with its own task's labels.

Where only the answer and how sure it is matter (accuracy, margins), `rank_labels` scores no more
than it must: a label's log-likelihood can only fall as its tokens are added, so its first token's
log-probability bounds it, and a label whose bound is below the second-best finished label cannot be
among the top two. Labels are finished best bound first until none can; the answer and margin are
those of scoring every label.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from .data import Example
from .model import ContinualModel
from .prompts import TaskPrompt
from .task_router import route


def _pad(rows: list[list[int]], value: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long, device=device)
        mask[i, span] = 1
    return ids, mask


def _encode_prompts(model: ContinualModel, prompts: list[list[int]], tasks: list[str]):
    """One forward over the (left-padded) prompts, each read through its task's experts:
    (log-probabilities of the next token per prompt, the prompts' key/value cache, their mask)."""
    model.route(tasks)
    ids, mask = _pad(prompts, model.tokenizer.pad_token_id, left=True, device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.backbone.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return F.log_softmax(model.vocabulary_logits(out.last_hidden_state[:, -1]), dim=-1), out.cache, mask


def _continuations(model: ContinualModel, cache, mask: torch.Tensor, owner: torch.Tensor,
                   answers: list[list[int]], tasks: list[str]) -> torch.Tensor:
    """Per row r, the summed log-probabilities of the tokens of `answers[r]` after its first, continuing
    prompt `owner[r]` from the prompts' `cache` (which this consumes: pass a `_fork` to keep it)."""
    device = model.device
    answer_ids, answer_mask = _pad(answers, model.tokenizer.pad_token_id, left=False, device=device)
    if answer_ids.shape[1] == 1:
        return torch.zeros(len(answers), device=device)
    cache.batch_select_indices(owner)  # continuation row r extends prompt owner[r] with its answer
    model.route([tasks[i] for i in owner.tolist()])
    inputs, inputs_mask = answer_ids[:, :-1], answer_mask[:, 1:]
    cont = model.backbone.base_model(
        input_ids=inputs,
        attention_mask=torch.cat([mask[owner], inputs_mask], dim=1),
        position_ids=mask.sum(-1)[owner, None] + torch.arange(inputs.shape[1], device=device),
        cache=cache,
    )
    token_lp = F.log_softmax(model.vocabulary_logits(cont.last_hidden_state), dim=-1)
    token_lp = token_lp.gather(-1, answer_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_lp * inputs_mask).sum(-1)


def _fork(cache) -> DynamicCache:
    """A cache over the same tensors that a continuation can select from and extend, leaving `cache` as it is."""
    return DynamicCache([(layer.keys, layer.values) for layer in cache.layers])


@torch.no_grad()
def answer_log_likelihoods(model: ContinualModel, prompts: list[list[int]], tasks: list[str],
                           answers: list[list[list[int]]]) -> list[torch.Tensor]:
    """Per prompt, the summed log-probabilities of each of its own answers (`answers[i]` after
    `prompts[i]`), each prompt read through the experts of its task: prompts of several tasks, with
    label sets of any sizes, share one forward and one batched continuation."""
    first, cache, mask = _encode_prompts(model, prompts, tasks)
    counts = [len(row) for row in answers]
    owner = torch.repeat_interleave(torch.arange(len(prompts), device=model.device),
                                    torch.tensor(counts, device=model.device))
    flat = [a for row in answers for a in row]
    first_tokens = torch.tensor([a[0] for a in flat], device=model.device)
    scores = first[owner, first_tokens] + _continuations(model, cache, mask, owner, flat, tasks)
    return list(scores.split(counts))


@torch.no_grad()
def top_two(model: ContinualModel, prompts: list[list[int]], tasks: list[str],
            answers: list[list[list[int]]]) -> list[tuple[int, float]]:
    """Per prompt, (index of its best answer, log-likelihood margin over the runner-up; inf for a
    single answer), as `answer_log_likelihoods` would rank them, finishing only the answers whose
    first-token bound can still reach the top two."""
    first, cache, mask = _encode_prompts(model, prompts, tasks)
    first = first.cpu()
    bounds = [first[i, [a[0] for a in row]].tolist() for i, row in enumerate(answers)]
    finished = [{j: bound for j, (bound, a) in enumerate(zip(row, answers[i])) if len(a) == 1}
                for i, row in enumerate(bounds)]
    while True:
        picks = []  # (prompt, answer): per prompt, its open answer of highest bound that can still place
        for i, row in enumerate(bounds):
            done = sorted(finished[i].values(), reverse=True)
            floor = done[1] if len(done) > 1 else float("-inf")
            open_ = [j for j in range(len(row)) if j not in finished[i] and row[j] >= floor]
            if open_:
                picks.append((i, max(open_, key=row.__getitem__)))
        if not picks:
            break
        owner = torch.tensor([i for i, _ in picks], device=model.device)
        rest = _continuations(model, _fork(cache), mask, owner, [answers[i][j] for i, j in picks], tasks)
        for (i, j), tail in zip(picks, rest.cpu().tolist()):
            finished[i][j] = bounds[i][j] + tail
    result = []
    for i, scores in enumerate(finished):
        ranked = sorted(scores, key=lambda j: (-scores[j], j))  # ties: the lower index, as argmax
        margin = scores[ranked[0]] - scores[ranked[1]] if len(answers[i]) > 1 else float("inf")
        result.append((ranked[0], margin))
    return result


def label_log_likelihoods(model: ContinualModel, prompts: list[list[int]], answers: list[list[int]],
                          task: str) -> torch.Tensor:
    """(len(prompts), len(answers)) summed log-probabilities of each of one task's answers after each prompt."""
    return torch.stack(answer_log_likelihoods(model, prompts, [task] * len(prompts), [answers] * len(prompts)))


@torch.no_grad()
def predict(model: ContinualModel, prompt: TaskPrompt, texts: list[str], batch_size: int,
            progress: bool = False) -> list[int]:
    """Predicted label index per text for the prompt's task."""
    return rank_labels(model, prompt, texts, batch_size, progress)[0]


@torch.no_grad()
def rank_labels(model: ContinualModel, prompt: TaskPrompt, texts: list[str], batch_size: int,
                progress: bool = False) -> tuple[list[int], list[float]]:
    """(predicted label index, margin over the runner-up) per text for the prompt's task: what
    `label_scores` gives through argmax and `margins`, scoring only labels that can place (LM head)."""
    if model.head == "classifier":
        scores = label_scores(model, prompt, texts, batch_size, progress)
        return scores.argmax(-1).tolist(), margins(scores)
    was_training = model.training
    model.eval()
    step = batch_size  # prompts per forward; a round continues at most one label of each
    best, sure = [], []
    try:
        for start in tqdm(range(0, len(texts), step), desc=f"eval {prompt.task}", disable=not progress, leave=False):
            chunk = [prompt.prompt(t) for t in texts[start:start + step]]
            with model.autocast():
                ranked = top_two(model, chunk, [prompt.task] * len(chunk), [prompt.answers] * len(chunk))
            best += [index for index, _ in ranked]
            sure += [margin for _, margin in ranked]
    finally:
        model.train(was_training)
    return best, sure


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
            with model.autocast():
                if model.head == "classifier":
                    model.route([task] * len(chunk))
                    ids, mask = _pad(chunk, model.tokenizer.pad_token_id, left=False, device=model.device)
                    batch_scores = model.class_logits(ids, mask, task)
                else:
                    batch_scores = label_log_likelihoods(model, chunk, prompt.answers, task)
            scores.append(batch_scores.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores) if scores else torch.empty(0, len(prompt.labels))


def accuracy(model: ContinualModel, prompt: TaskPrompt, examples: list[Example], batch_size: int,
             progress: bool = False) -> float:
    predicted = predict(model, prompt, [e.text for e in examples], batch_size, progress)
    return sum(p == e.label for p, e in zip(predicted, examples)) / len(examples)


def answer(model: ContinualModel, prompts: dict[str, TaskPrompt], texts: list[str], tasks: list[str | None],
           batch_size: int = 8) -> list[tuple[str, str] | tuple[None, None]]:
    """(task, label) per text. A text without a task (None or "") is routed to one by the model's
    task-free router first, and answered (None, None) when the router finds it of no known task;
    then every routed text is scored against its task's labels, texts of several tasks in one batch."""
    unknown = sorted({t for t in tasks if t and t not in prompts})
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; this model knows {sorted(prompts)}")
    tasks = list(tasks)
    untold = [i for i, t in enumerate(tasks) if not t]
    if untold:
        budget = max(p.max_length for p in prompts.values())
        routed = route(model, [texts[i] for i in untold], budget, batch_size)
        for i, task in zip(untold, routed):
            tasks[i] = task
    known = [i for i, t in enumerate(tasks) if t]
    scores = row_label_scores(model, prompts, [texts[i] for i in known], [tasks[i] for i in known], batch_size)
    answers: list[tuple[str, str] | tuple[None, None]] = [(None, None)] * len(texts)
    for i, row in zip(known, scores):
        answers[i] = (tasks[i], prompts[tasks[i]].labels[int(row.argmax())])
    return answers


@torch.no_grad()
def row_label_scores(model: ContinualModel, prompts: dict[str, TaskPrompt], texts: list[str], tasks: list[str],
                     batch_size: int) -> list[torch.Tensor]:
    """Per text, the scores of its task's labels. In LM mode, texts of different tasks are scored
    together, in the given order, about `4 * batch_size` (text, label) pairs per forward; a
    classifier head reads one task at a time."""
    if model.head == "classifier":
        result: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            for i, row in zip(rows, label_scores(model, prompts[task], [texts[i] for i in rows], batch_size)):
                result[i] = row
        return result
    chunks, chunk, pairs = [], [], 0
    for i, task in enumerate(tasks):
        if chunk and pairs + len(prompts[task].answers) > 4 * batch_size:
            chunks.append(chunk)
            chunk, pairs = [], 0
        chunk.append(i)
        pairs += len(prompts[task].answers)
    chunks += [chunk] if chunk else []
    was_training = model.training
    model.eval()
    scores: list[torch.Tensor] = []
    try:
        for rows in chunks:
            with model.autocast():
                scores += answer_log_likelihoods(model, [prompts[tasks[i]].prompt(texts[i]) for i in rows],
                                                 [tasks[i] for i in rows], [prompts[tasks[i]].answers for i in rows])
    finally:
        model.train(was_training)
    return [row.cpu() for row in scores]
