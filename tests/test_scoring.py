"""Label scoring: one prompt encoding shared by every label must equal scoring each label alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moecl.prompts import TaskPrompt
from moecl.scoring import label_log_likelihoods, predict


def _brute_force(model, prompt_ids: list[int], answer: list[int]) -> float:
    """Run prompt + answer as one sequence and sum the answer tokens' log-probabilities."""
    ids = torch.tensor([prompt_ids + answer])
    logits = model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    log_probs = F.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return log_probs.gather(-1, torch.tensor(answer)[:, None]).sum().item()


def test_cached_label_scoring_equals_per_label_forward(tiny_model):
    model = tiny_model("moecl")
    labels = ["World", "Sports", "Science or Technology", "very negative"]
    model.add_task("news", labels)
    with torch.no_grad():  # non-zero experts, so the routing matters too
        for name, param in model.named_parameters():
            if ".experts." in name or ".gates." in name:
                param.normal_(0, 0.2)
    model.eval()
    prompt = TaskPrompt(model.tokenizer, "news", labels, max_length=64)
    texts = ["short one", "a much longer text that takes many more tokens than the first one does", "mid size text"]
    prompts = [prompt.prompt(t) for t in texts]
    model.route(["news"] * len(texts))
    fast = label_log_likelihoods(model, prompts, prompt.answers)
    slow = torch.tensor([[_brute_force(model, p, a) for a in prompt.answers] for p in prompts])
    assert fast.shape == (3, 4)
    assert torch.allclose(fast, slow, atol=1e-4), (fast, slow)
    assert predict(model, prompt, texts, batch_size=2) == slow.argmax(-1).tolist()


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
