"""Integration on the real SmolLM2-135M-Instruct backbone (converted once from the installed GGUF)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moecl.cli import main
from moecl.config import config_from_dict
from moecl.task_router import text_features
from moecl.trainer import Trainer

pytestmark = pytest.mark.slow
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "mtl5" / "dbpedia"


def test_training_lowers_the_loss_and_predict_answers_with_a_label(tmp_path, capsys):
    cfg = config_from_dict({
        "backbone": "smollm2-135m-instruct", "method": "moecl",
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_length": 96, "max_per_label": 2, "seed": 0},
        "eval": {"max_per_label": 1, "batch_size": 8},
        "tasks": [{"name": "dbpedia", "data": str(SAMPLE)}],
    })
    trainer = Trainer(cfg, tmp_path / "run")
    model, task, prompt = trainer.model, trainer.tasks[0], trainer.prompts["dbpedia"]
    probe = [prompt.training_pair(e) for e in task.test[:8]]
    width = max(len(e.ids) for e in probe)
    ids = torch.tensor([e.ids + [model.tokenizer.pad_token_id] * (width - len(e.ids)) for e in probe])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in probe])
    mask = (torch.arange(width)[None] < torch.tensor([len(e.ids) for e in probe])[:, None]).long()

    def probe_loss() -> float:
        model.eval()
        model.route(["dbpedia"] * len(probe))
        with torch.no_grad(), model.autocast():  # as every forward of the model runs
            return model.lm_loss(ids, mask, labels).item()

    model.routing.bypass = True  # new experts add nothing, so the bare backbone is the untrained model
    before = probe_loss()
    model.routing.bypass = False
    metrics = trainer.run()
    after = probe_loss()
    assert after < before - 0.5, (before, after)
    assert metrics["tasks"] == ["dbpedia"] and len(metrics["accuracy_matrix"]) == 1

    code = main(["predict", "--model", str(tmp_path / "run"), "--task", "dbpedia",
                 "Title: Mount Rainier\nText: A large active stratovolcano in the Cascade Range of Washington.",
                 "Title: Toyota Corolla\nText: A line of compact cars manufactured by Toyota since 1966."])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(printed) == 2 and set(printed) <= set(task.labels)


def test_task_free_routing_tells_the_sample_tasks_apart():
    """The router reads the frozen backbone alone, so it can be checked without training."""
    cfg = config_from_dict({
        "backbone": "smollm2-135m-instruct", "method": "moecl", "train": {"max_length": 96},
        "eval": {"max_per_label": 4, "batch_size": 16}, "router": {"fit_per_task": 64},
        "tasks": [{"name": t, "data": str(SAMPLE.parent / t)} for t in ("dbpedia", "agnews", "yelp")],
    })
    trainer = Trainer(cfg, "unused")
    for task in trainer.tasks:
        trainer.model.add_task(task.name, task.labels)
        texts = [e.text for e in task.train][: cfg.router.fit_per_task]
        trainer.model.task_router.fit(task.name, text_features(trainer.model, texts, 96))
    routed = trainer.routing_accuracy()
    assert min(routed.values()) >= 0.9, routed


def test_ranking_on_the_real_backbone_finishes_few_labels_and_answers_as_scoring_all(monkeypatch):
    """On SmolLM2, even untrained, a label's first token already rules many labels out: the bounded
    ranking runs fewer label continuations than there are labels (two thirds on dbpedia's 14, measured),
    for the same answers and margins."""
    import moecl.scoring as scoring
    from moecl.data import load_task
    from moecl.scoring import label_scores, margins, rank_labels

    # fp32: margins are compared to 1e-3, and bf16 rounds batches of other widths differently
    cfg = config_from_dict({"backbone": "smollm2-135m-instruct", "method": "moecl",
                            "train": {"max_length": 128, "precision": "fp32"},
                            "tasks": [{"name": "dbpedia", "data": str(SAMPLE)}]})
    trainer = Trainer(cfg, "unused")
    finished, pad = [], scoring._pad

    def counting(rows, value, left, device):
        finished.append(0 if left else len(rows))
        return pad(rows, value, left, device)

    for task in trainer.tasks:
        trainer.model.add_task(task.name, task.labels)
        prompt = trainer.prompts[task.name]
        texts = [e.text for e in load_task(task.name, SAMPLE).test[:16]]
        exhaustive = label_scores(trainer.model, prompt, texts, batch_size=8)
        monkeypatch.setattr(scoring, "_pad", counting)
        finished.clear()
        best, sure = rank_labels(trainer.model, prompt, texts, batch_size=8)
        monkeypatch.setattr(scoring, "_pad", pad)
        assert best == exhaustive.argmax(-1).tolist(), task.name
        assert torch.allclose(torch.tensor(sure), torch.tensor(margins(exhaustive)), atol=1e-3), task.name
        print(task.name, "continuations", sum(finished), "of", len(texts) * len(task.labels))
        assert sum(finished) < 0.8 * len(texts) * len(task.labels), (task.name, sum(finished))
