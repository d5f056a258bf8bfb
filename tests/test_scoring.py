"""Label scoring: one prompt encoding shared by every label must equal scoring each label alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moecl.prompts import TaskPrompt
from moecl.scoring import answer, label_log_likelihoods, predict, row_label_scores


def _brute_force(model, prompt_ids: list[int], answer: list[int]) -> float:
    """Run prompt + answer as one sequence and sum the answer tokens' log-probabilities."""
    ids = torch.tensor([prompt_ids + answer])
    logits = model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    log_probs = F.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return log_probs.gather(-1, torch.tensor(answer)[:, None]).sum().item()


def _model_with_experts(tiny_model, tasks: dict[str, list[str]]):
    model = tiny_model("moecl")
    for task, labels in tasks.items():
        model.add_task(task, labels)
    with torch.no_grad():  # non-zero experts, so the routing matters too
        for name, param in model.named_parameters():
            if ".experts." in name or ".gates." in name:
                param.normal_(0, 0.2)
    model.eval()
    return model


def test_cached_label_scoring_equals_per_label_forward(tiny_model):
    labels = ["World", "Sports", "Science or Technology", "very negative"]
    model = _model_with_experts(tiny_model, {"news": labels})
    prompt = TaskPrompt(model.tokenizer, "news", labels, max_length=64)
    texts = ["short one", "a much longer text that takes many more tokens than the first one does", "mid size text"]
    prompts = [prompt.prompt(t) for t in texts]
    fast = label_log_likelihoods(model, prompts, prompt.answers, "news")
    slow = torch.tensor([[_brute_force(model, p, a) for a in prompt.answers] for p in prompts])
    assert fast.shape == (3, 4)
    assert torch.allclose(fast, slow, atol=1e-4), (fast, slow)
    assert predict(model, prompt, texts, batch_size=2) == slow.argmax(-1).tolist()


def test_a_batch_mixing_tasks_scores_each_row_as_its_task_alone(tiny_model):
    """Rows of two tasks with label sets of different sizes in one forward: each row's scores are
    those of its task scored on its own (its experts, its labels)."""
    tasks = {"news": ["World", "Sports", "Science or Technology"], "mood": ["very negative", "positive"]}
    model = _model_with_experts(tiny_model, tasks)
    prompts = {t: TaskPrompt(model.tokenizer, t, labels, max_length=64) for t, labels in tasks.items()}
    texts = ["short one", "a much longer text that takes many more tokens", "mid size text", "ok", "fine then"]
    row_tasks = ["news", "mood", "mood", "news", "mood"]
    mixed = row_label_scores(model, prompts, texts, row_tasks, batch_size=2)  # 8 (text, label) pairs per forward
    for text, task, scores in zip(texts, row_tasks, mixed):
        alone = label_log_likelihoods(model, [prompts[task].prompt(text)], prompts[task].answers, task)[0]
        assert scores.shape == (len(tasks[task]),) and torch.allclose(scores, alone, atol=1e-4), (task, scores, alone)
    assert answer(model, prompts, texts, row_tasks) == [(t, tasks[t][int(s.argmax())]) for t, s in zip(row_tasks, mixed)]


def test_prompt_truncates_only_the_text(tiny_model):
    model = tiny_model("seq-lora")
    prompt = TaskPrompt(model.tokenizer, "news", ["a", "b"], max_length=40)
    encoded = prompt.training_pair(type("E", (), {"text": "word " * 500, "label": 1})())
    ids, labels = encoded.ids, encoded.labels
    assert len(ids) <= 40
    assert ids[encoded.text_length: encoded.text_length + len(prompt.suffix)] == prompt.suffix  # instruction intact
    assert encoded.text_length == prompt.text_budget  # the text, and only the text, was cut
    answer = [t for t in labels if t != -100]
    assert answer == prompt.answers[1] and answer[-1] == model.tokenizer.eos_token_id


def _finished_labels(monkeypatch):
    """A list that collects how many (prompt, label) continuations each scoring call runs."""
    import moecl.scoring as scoring

    finished, original = [], scoring._pad

    def counting(rows, value, left, device):  # answer batches are the right-padded ones
        if not left:
            finished.append(len(rows))
        return original(rows, value, left, device)

    monkeypatch.setattr(scoring, "_pad", counting)
    return finished


def _shipped_label_sets() -> dict[str, list[str]]:
    import json
    from pathlib import Path

    samples = Path(__file__).resolve().parents[1] / "samples" / "mtl5"
    return {d.name: json.loads((d / "labels.json").read_text()) for d in sorted(samples.iterdir())}


def test_ranking_only_the_labels_that_can_place_gives_the_answers_and_margins_of_scoring_all(tiny_model):
    """The shipped tasks' real label sets: the bounded ranking gives the argmax and margin of
    exhaustive scoring (ties included: a random model's labels score alike)."""
    from moecl.scoring import label_scores, margins, rank_labels

    tasks = _shipped_label_sets()
    model = _model_with_experts(tiny_model, tasks)
    for task, labels in tasks.items():
        prompt = TaskPrompt(model.tokenizer, task, labels, max_length=128)
        texts = [f"{task} text {i}: " + " ".join(["word"] * (i % 7)) for i in range(24)]
        exhaustive = label_scores(model, prompt, texts, batch_size=4)
        best, sure = rank_labels(model, prompt, texts, batch_size=4)
        assert best == exhaustive.argmax(-1).tolist(), task
        assert torch.allclose(torch.tensor(sure), torch.tensor(margins(exhaustive)), atol=1e-4), task
