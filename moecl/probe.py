"""How much task information the shared expert carries: a fresh linear probe, fit after training.

The discriminators that train with MoE-CL are adversaries, not measurements: they see a few memory
rows, train for as long as a stage lasts and average stages of different chance levels. This probe
is fit from scratch on what they read, the live shared expert's contribution to each layer's FFN
output mean-pooled over a text's tokens, for texts of every task seen, and scored on other texts.
If the adversary makes the shared expert task-general, its probe accuracy falls toward chance
against moecl-nogan's (the same run with λ = 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .prompts import encode_text


@torch.no_grad()
def shared_contributions(model, texts: list[str], tasks: list[str], budget: int,
                         batch_size: int = 16) -> torch.Tensor:
    """(layers, len(texts), hidden): per FFN layer, the live shared expert's pooled contribution
    for each text, run as the text's own task (its expert and gate shape the layers below). A text
    comes first in every prompt of a causal model, so its tokens alone give the states training saw."""
    if not model.has_discriminator or len(model.tasks) < 2:
        raise ValueError(f"a probe needs a shared expert with gates and two tasks ({model.method}, {model.tasks})")
    state, rows, was_training = model.routing, [], model.training
    model.eval()
    for start in range(0, len(texts), batch_size):
        ids = [encode_text(model.tokenizer, t, budget) for t in texts[start:start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([s + [model.tokenizer.pad_token_id] * (width - len(s)) for s in ids], device=model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=model.device)
        model.route(tasks[start:start + batch_size], text_mask=mask, adversarial_weight=1.0)  # no gradient: λ unused
        with model.autocast():
            model.hidden_states(input_ids, mask)
        rows.append(torch.stack(state.disc_inputs).float().cpu())
    model.route([tasks[0]])  # leave no discriminator collection switched on
    model.train(was_training)
    return torch.cat(rows, dim=1)


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   l2: float = 1e-2, steps: int = 200) -> float:
    """Balanced held-out accuracy of a multinomial logistic regression (standardised features, L2,
    L-BFGS) fit on `train`: the mean over classes of the share of each class's test rows it gets."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-8)
    x, x_test = ((train - mean) / std).double(), ((test - mean) / std).double()
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(x @ weight + bias, train_labels) + l2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        predicted = (x_test @ weight + bias).argmax(-1)
    present = test_labels.unique()
    return sum((predicted[test_labels == c] == c).double().mean().item() for c in present) / len(present)


def shared_expert_probe(model, train_texts: dict[str, list[str]], test_texts: dict[str, list[str]],
                        budget: int) -> dict:
    """Per layer and on average, the probe's balanced held-out accuracy at telling the task of a text
    from the shared expert's contribution alone, with chance (1 / tasks)."""
    tasks = list(train_texts)
    def features(split):
        texts = [t for task in tasks for t in split[task]]
        labels = torch.tensor([i for i, task in enumerate(tasks) for _ in split[task]])
        return shared_contributions(model, texts, [task for task in tasks for _ in split[task]], budget), labels
    (train, train_labels), (test, test_labels) = features(train_texts), features(test_texts)
    per_layer = [probe_accuracy(train[i], train_labels, test[i], test_labels) for i in range(train.shape[0])]
    return {"tasks": tasks, "chance": 1 / len(tasks), "per_layer": per_layer,
            "mean": sum(per_layer) / len(per_layer), "max": max(per_layer)}
