"""The shared-expert probe: what it reads, and that it measures task information, not noise."""
from __future__ import annotations

import pytest
import torch

from moecl.probe import probe_accuracy, shared_contributions, shared_expert_probe

from .test_experts import _two_task_model


def test_the_probe_reads_what_the_discriminators_read(tiny_model):
    model = _two_task_model(tiny_model)
    texts, tasks = ["one two three", "four five", "six seven eight nine"], ["a", "b", "a"]
    features = shared_contributions(model, texts, tasks, budget=32)
    assert features.shape == (len(model.ffn_modules()), 3, model.backbone.config.hidden_size)
    # One text alone gives the same row as in the batch (padding and batch-mates do not leak in).
    alone = shared_contributions(model, texts[1:2], tasks[1:2], budget=32)
    torch.testing.assert_close(alone[:, 0], features[:, 1], rtol=1e-4, atol=1e-6)
    assert model.routing.disc_labels is None  # collection switched off again


def test_a_model_without_a_shared_expert_gate_cannot_be_probed(tiny_model):
    model = tiny_model("inc-lora")
    for task in ("a", "b"):
        model.add_task(task, ["x", "y"])
    with pytest.raises(ValueError, match="shared expert"):
        shared_expert_probe(model, {"a": ["x"], "b": ["y"]}, {"a": ["x"], "b": ["y"]}, 16)


def test_probe_accuracy_finds_task_information_and_reports_chance_without_it():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(60)
    noise = lambda: torch.randn(180, 20, generator=generator)  # noqa: E731
    informative = torch.eye(20)[labels] * 3
    half = labels[::2], labels[1::2]
    assert probe_accuracy(noise()[::2] + informative[::2], half[0], noise()[1::2] + informative[1::2], half[1]) > 0.8  # Bayes: ~0.96
    assert abs(probe_accuracy(noise()[::2], half[0], noise()[1::2], half[1]) - 1 / 3) < 0.15
