"""Training runs on a tiny random Llama: isolation, checkpoints, resume, and every method."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moecl.checkpoint import load_model
from moecl.cli import main
from moecl.config import METHODS, load_config
from moecl.manifest import read_manifest
from moecl.scoring import label_log_likelihoods, predict
from moecl.trainer import Trainer
from tests.conftest import write_config, write_task


def _adapters(run_dir, group: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint" / "adapters" / f"{group}.safetensors")


def _train(tmp_path, task_dirs, name="run", resume=False, **overrides):
    cfg = load_config(write_config(tmp_path / f"{name}.yaml", task_dirs, **overrides))
    return Trainer(cfg, tmp_path / name).run(resume=resume)


def test_earlier_experts_stay_bit_identical_after_later_tasks(tmp_path, task_dirs):
    first = {"topics": task_dirs["topics"]}
    _train(tmp_path, first)
    after_first = {g: _adapters(tmp_path / "run", g) for g in ("expert-topics", "expert-shared")}
    _train(tmp_path, task_dirs, resume=True)  # same run folder, two more tasks
    final_topics = _adapters(tmp_path / "run", "expert-topics")
    final_shared = _adapters(tmp_path / "run", "expert-shared")
    assert after_first["expert-topics"].keys() == final_topics.keys()
    for key, tensor in after_first["expert-topics"].items():
        assert torch.equal(tensor, final_topics[key]), key
    assert any(not torch.equal(t, final_shared[k]) for k, t in after_first["expert-shared"].items())


def test_checkpoint_round_trip_is_exact(tmp_path, task_dirs):
    _train(tmp_path, task_dirs)
    trainer_model, prompts, manifest = load_model(tmp_path / "run")
    assert manifest["tasks"] == list(task_dirs)
    reloaded, _, _ = load_model(tmp_path / "run" / "checkpoint")
    original = {g: _adapters(tmp_path / "run", g) for g in trainer_model.adapter_groups()}
    for group, tensors in reloaded.adapter_groups().items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, original[group][key]), (group, key)
    texts = ["this one is about cat golf", "this one is about fish"]
    assert predict(reloaded, prompts["animals"], texts, 4) == predict(trainer_model, prompts["animals"], texts, 4)


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, task_dirs, monkeypatch):
    straight = _train(tmp_path, task_dirs, name="straight")

    original = Trainer.train_stage

    def crash_on_second_task(self, stage, past, index):
        if index == 1:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, stage, past, index)

    monkeypatch.setattr(Trainer, "train_stage", crash_on_second_task)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, task_dirs, name="resumed")
    assert json.loads((tmp_path / "resumed/checkpoint/manifest.json").read_text())["tasks"] == ["topics"]
    monkeypatch.setattr(Trainer, "train_stage", original)
    resumed = _train(tmp_path, task_dirs, name="resumed", resume=True)

    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert resumed["aa"] == straight["aa"] and resumed["bwt"] == straight["bwt"]
    for group in ("expert-shared", "expert-animals", "router"):
        a, b = _adapters(tmp_path / "straight", group), _adapters(tmp_path / "resumed", group)
        assert all(torch.equal(a[k], b[k]) for k in a), group


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path, task_dirs):
    _train(tmp_path, {"topics": task_dirs["topics"]})
    before = (tmp_path / "run/checkpoint/manifest.json").read_text()
    code = main(["train", str(write_config(tmp_path / "again.yaml", task_dirs)), "--out", str(tmp_path / "run")])
    assert code == 2
    assert (tmp_path / "run/checkpoint/manifest.json").read_text() == before


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports(tmp_path, task_dirs, method):
    metrics = _train(tmp_path, task_dirs, method=method, train={"epochs": 1})
    rows = metrics["accuracy_matrix"]
    if method == "mtl":
        assert len(rows) == 1 and len(rows[0]) == 3 and metrics["bwt"] is None
    else:
        assert [len(r) for r in rows] == [1, 2, 3]
        assert isinstance(metrics["bwt"], float)
    assert all(0.0 <= a <= 1.0 for row in rows for a in row)
    assert (tmp_path / "run" / "heatmap.png").stat().st_size > 1000
    groups = set(_adapters_groups(tmp_path / "run"))
    expected_experts = {
        "moecl": {"shared", "topics", "sentiment", "animals", "shared@topics", "shared@sentiment", "shared@animals"},
        "moecl-nogan": {"shared", "topics", "sentiment", "animals", "shared@topics", "shared@sentiment", "shared@animals"},
        "seq-lora": {"shared"}, "replay": {"shared"}, "mtl": {"shared"},
        "inc-lora": {"topics", "sentiment", "animals"}, "olora": {"topics", "sentiment", "animals"},
        "inc-lora-warm": {"topics", "sentiment", "animals"}, "inc-lora-r16": {"topics", "sentiment", "animals"},
    }[method]
    assert {g.removeprefix("expert-") for g in groups if g.startswith("expert-")} == expected_experts


def _adapters_groups(run_dir):
    return [f.stem for f in (run_dir / "checkpoint" / "adapters").glob("*.safetensors")]


def test_moecl_trains_its_discriminator_on_memory_of_old_tasks(tmp_path, task_dirs, caplog):
    caplog.set_level("INFO", logger="moecl")
    metrics = _train(tmp_path, task_dirs, memory={"per_task": 6, "per_batch": 3})
    disc_lines = [r.getMessage() for r in caplog.records if "disc_acc=" in r.getMessage()]
    assert disc_lines and all("task=" in line and "loss=" in line for line in disc_lines)
    assert all("topics" not in line.split()[0] for line in disc_lines)  # first task has no discriminator
    stages = metrics["training"]
    assert [s["stage"] for s in stages] == list(task_dirs) and "disc_acc" not in stages[0]
    assert all(0.0 <= s["disc_acc"] <= 1.0 for s in stages[1:])


def test_classifier_head_mode_trains_and_predicts(tmp_path, task_dirs):
    metrics = _train(tmp_path, task_dirs, head="classifier", train={"lr": 0.05, "epochs": 8}, retention={"distill": 0.0})
    assert metrics["accuracy_matrix"][0][0] > 1 / 3  # learns the first task beyond chance
    assert {"head-topics", "head-sentiment", "head-animals"} <= set(_adapters_groups(tmp_path / "run"))


def test_learning_a_task_beats_chance(tmp_path, task_dirs):
    metrics = _train(tmp_path, {"topics": task_dirs["topics"]}, method="seq-lora", train={"epochs": 8, "lr": 0.01})
    assert metrics["accuracy_matrix"][0][0] > 1 / 3


def test_predict_without_a_task_routes_each_text_and_prints_task_and_label(tmp_path, task_dirs, capsys):
    metrics = _train(tmp_path, task_dirs, train={"epochs": 1})
    # A random 2-layer model is a weak feature extractor (SmolLM2's routing is in test_smollm2.py),
    # but it must still beat chance on held-out texts and route texts like those it was fit on.
    assert min(metrics["routing_accuracy"].values()) > 1 / 3, metrics["routing_accuracy"]
    texts = ["review train 1 charlie: good good good good good good", "pet train 2 foxtrot: fish fish fish fish fish fish"]
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "run"), *texts]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [task for task, _ in printed] == ["sentiment", "animals"]
    assert printed[0][1] in {"bad", "good"} and printed[1][1] in {"cat", "dog", "bird", "fish"}


def test_old_tasks_gates_stay_bit_identical_and_the_new_tasks_gate_trains(tmp_path, task_dirs):
    _train(tmp_path, {"topics": task_dirs["topics"]})
    before = _adapters(tmp_path / "run", "expert-topics")
    _train(tmp_path, task_dirs, resume=True)
    after = _adapters(tmp_path / "run", "expert-topics")
    gates = [k for k in before if ".gates.topics." in k]
    assert gates and all(torch.equal(before[k], after[k]) for k in gates)
    animals = _adapters(tmp_path / "run", "expert-animals")
    assert any(".gates.animals." in k and t.any() for k, t in animals.items())  # moved off its zero start


def test_distillation_targets_are_the_models_own_answers_before_the_stage(tmp_path, task_dirs):
    cfg = load_config(write_config(tmp_path / "c.yaml", task_dirs, memory={"per_task": 4, "per_batch": 2},
                                   retention={"distill": 1.0}))
    trainer = Trainer(cfg, tmp_path / "run")
    topics = trainer.tasks[0]
    trainer.model.add_task(topics.name, topics.labels)
    trainer.train_stage([topics], [], 0)
    memory = trainer._memory([topics])
    answers = predict(trainer.model, trainer.prompts["topics"], [r.example.text for r in memory], 4)
    assert [r.example.label for r in memory] == answers  # the model's answers, not the gold labels
    for row in memory:
        assert row.teacher.shape[0] == len(trainer.prompts["topics"].answers[row.example.label])
        assert torch.allclose(row.teacher.exp().sum(-1), torch.ones(row.teacher.shape[0]), atol=1e-4)


def _old_task_scores(run_dir) -> torch.Tensor:
    model, prompts, _ = load_model(run_dir)
    texts = ["this one is about sports golf", "science science", "politics and more"]
    return label_log_likelihoods(model, [prompts["topics"].prompt(t) for t in texts], prompts["topics"].answers, "topics")


@pytest.mark.parametrize("shared", ["snapshot", "live"])
def test_an_old_tasks_answers_change_later_only_with_a_live_shared_expert(tmp_path, task_dirs, shared):
    settings = {"train": {"epochs": 2}, "retention": {"shared": shared}}
    _train(tmp_path, {"topics": task_dirs["topics"]}, **settings)
    before = _old_task_scores(tmp_path / "run")
    _train(tmp_path, task_dirs, resume=True, **settings)
    after = _old_task_scores(tmp_path / "run")
    groups = set(_adapters_groups(tmp_path / "run"))
    if shared == "snapshot":
        assert torch.equal(before, after)
        assert {"expert-shared@topics", "expert-shared@sentiment", "expert-shared@animals"} <= groups
    else:
        assert not torch.allclose(before, after)
        assert not any("@" in g for g in groups)


def test_a_task_trained_again_reads_the_live_shared_expert_then_a_new_snapshot(tmp_path, task_dirs):
    _train(tmp_path, task_dirs, train={"epochs": 1})
    cfg = load_config(write_config(tmp_path / "again.yaml", task_dirs, train={"epochs": 1}))
    trainer = Trainer(cfg, tmp_path / "again")
    topics = trainer.tasks[0]
    trainer.extend(read_manifest(tmp_path / "run"), [[topics]])
    snapshot = _adapters(tmp_path / "again", "expert-shared@topics")
    live = _adapters(tmp_path / "again", "expert-shared")
    assert len(snapshot) == len(live)
    assert all(torch.equal(t, live[k.replace("shared@topics", "shared")]) for k, t in snapshot.items())  # re-taken
    old = _adapters(tmp_path / "run", "expert-shared")
    assert any(not torch.equal(old[k], live[k]) for k in live)  # the live expert trained on topics again


def test_retraining_a_changed_task_reports_transfer_from_its_retraining(tmp_path, task_dirs):
    """A task whose data changed is trained again as a stage of its own: the accuracy matrix gains
    a row, BWT and forgetting measure the other tasks from their last training, and the heatmap
    names the stage."""
    _train(tmp_path, task_dirs, train={"epochs": 1})
    write_task(task_dirs["topics"], ["sports", "science", "politics"], per_label=(7, 3))  # one more row per label
    cfg = load_config(write_config(tmp_path / "again.yaml", task_dirs, train={"epochs": 1}))
    metrics = Trainer(cfg, tmp_path / "again").extend(read_manifest(tmp_path / "run"))  # the plan: changed tasks
    assert [s["stage"] for s in metrics["training"]] == ["topics", "sentiment", "animals", "topics"]
    matrix = metrics["accuracy_matrix"]
    assert len(matrix) == 4 and len(matrix[-1]) == 3
    expected = ((matrix[3][1] - matrix[1][1]) + (matrix[3][2] - matrix[2][2])) / 2  # topics was trained last
    assert metrics["bwt"] == pytest.approx(expected) and set(metrics["forgetting"]) == {"sentiment", "animals"}
    assert (tmp_path / "again" / "heatmap.png").is_file()


def test_a_task_with_a_changed_label_set_is_retrained_with_a_new_classifier_head(tmp_path, task_dirs):
    _train(tmp_path, task_dirs, head="classifier", train={"epochs": 1})
    write_task(task_dirs["topics"], ["sports", "science", "politics", "economy"])
    cfg = load_config(write_config(tmp_path / "again.yaml", task_dirs, head="classifier", train={"epochs": 1}))
    trainer = Trainer(cfg, tmp_path / "again")
    trainer.extend(read_manifest(tmp_path / "run"))
    assert [s["stage"] for s in trainer.progress.training][-1] == "topics"
    assert trainer.model.heads["topics"].out_features == 4 and trainer.model.heads["sentiment"].out_features == 2
    model, prompts, manifest = load_model(tmp_path / "again" / "checkpoint")
    assert manifest["labels"]["topics"] == prompts["topics"].labels == ["sports", "science", "politics", "economy"]
    assert model.heads["topics"].out_features == 4


# Every method: the first task before training adds nothing to the backbone (fresh experts), so its
# score is the bare backbone's from forward transfer's baseline (+1).
@pytest.mark.parametrize("method, retention, reused", [
    ("moecl", "snapshot", 3 + 1),  # stage 2 reuses topics; stage 3 topics and sentiment: frozen expert, gate, snapshot
    ("inc-lora", "snapshot", 3 + 3),  # an old task reads only its own frozen expert; a new one only its fresh one
    ("moecl", "live", 0 + 1),  # old tasks read the live shared expert, which every stage trains
    ("seq-lora", "snapshot", 0 + 1), ("olora", "snapshot", 0 + 1),  # one shared expert / a sum that grows
])
def test_reused_scores_leave_the_accuracy_matrix_as_scoring_everything(tmp_path, task_dirs, method, retention, reused):
    """With forward transfer too: its baseline is the bare backbone, scored before any task is added."""
    def run(name, reuse):
        cfg = load_config(write_config(tmp_path / f"{name}.yaml", task_dirs, method=method, train={"epochs": 1},
                                       retention={"shared": retention},
                                       eval={"batch_size": 4, "reuse": reuse, "forward_transfer": True}))
        trainer = Trainer(cfg, tmp_path / name)
        metrics = trainer.run()
        return (metrics["accuracy_matrix"], metrics["fwt"], trainer.progress.before_training), trainer.reused

    fresh, none_reused = run("fresh", reuse=False)
    matrix, count = run("reused", reuse=True)
    assert matrix == fresh and none_reused == 0 and fresh[1] is not None
    assert count == reused



def test_a_run_continuing_a_checkpoint_reuses_the_answers_saved_with_it(tmp_path, task_dirs):
    """The answers a run scored are saved with its checkpoint (answers.json); a run that continues
    it (as the pipeline's train step continues the champion) reuses them for the tasks whose tensors,
    test sets and settings are unchanged, and reports the accuracies scoring again gives."""
    first_two = {name: task_dirs[name] for name in ("topics", "sentiment")}
    cfg = load_config(write_config(tmp_path / "champion.yaml", first_two, train={"epochs": 1}))
    Trainer(cfg, tmp_path / "champion").run()
    saved = json.loads((tmp_path / "champion" / "checkpoint" / "answers.json").read_text())
    assert sorted(saved) == ["sentiment", "topics"] and len(saved["topics"]["correct"]) == 9
    rows = {}
    for reuse in (True, False):
        cfg = load_config(write_config(tmp_path / f"next-{reuse}.yaml", task_dirs, train={"epochs": 1},
                                       eval={"reuse": reuse}))
        trainer = Trainer(cfg, tmp_path / f"next-{reuse}")
        rows[reuse] = trainer.extend(read_manifest(tmp_path / "champion"))["accuracy_matrix"][-1], trainer.reused
    assert rows[True][0] == rows[False][0] and rows[True][1] == 2 and rows[False][1] == 0
    assert sorted(json.loads((tmp_path / "next-True" / "checkpoint" / "answers.json").read_text())) == [
        "animals", "sentiment", "topics"]

def test_moecl_nogan_is_moecl_with_a_zero_adversarial_weight(tmp_path, task_dirs):
    """Same memory rows, batches and random draws: every tensor but the discriminators' ends the same."""
    two = {name: task_dirs[name] for name in ("topics", "sentiment")}
    zero = _train(tmp_path, two, name="zero", method="moecl", adversarial={"weight": 0.0})
    nogan = _train(tmp_path, two, name="nogan", method="moecl-nogan")  # the config's weight 0.1 is not used
    assert zero["accuracy_matrix"] == nogan["accuracy_matrix"]
    groups = _adapters_groups(tmp_path / "zero")
    assert sorted(groups) == sorted(_adapters_groups(tmp_path / "nogan"))
    for group in groups:
        if group != "router":  # the discriminators: trained by moecl's stage, not by the ablation's
            left, right = _adapters(tmp_path / "zero", group), _adapters(tmp_path / "nogan", group)
            assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), group


def test_moecl_nogan_draws_the_batches_and_memory_rows_moecl_draws(tmp_path, task_dirs, monkeypatch):
    two = {name: task_dirs[name] for name in ("topics", "sentiment")}
    drawn = {"moecl": [], "moecl-nogan": []}
    batches = Trainer._batches

    def recording(self, examples, memory, rng):
        for rows, memory_rows in batches(self, examples, memory, rng):
            drawn[self.cfg.method].append(([e.text for e in rows], [r.example.text for r in memory_rows]))
            yield rows, memory_rows

    monkeypatch.setattr(Trainer, "_batches", recording)
    _train(tmp_path, two, name="moecl", method="moecl")
    _train(tmp_path, two, name="nogan", method="moecl-nogan")
    assert any(memory for _, memory in drawn["moecl"])  # the second stage rehearses the first's inputs
    assert drawn["moecl-nogan"] == drawn["moecl"]


def test_router_texts_hold_out_texts_the_router_was_not_fit_on():
    from moecl.data import Example
    from moecl.trainer import router_texts

    rows = [Example(f"text {i}", i % 2, "t") for i in range(100)]
    fit, held = router_texts(rows, fit=40, calibrate=30, max_per_label=None, seed=0)
    assert (len(fit), len(held)) == (40, 30) and not set(fit) & set(held)
    fit, held = router_texts(rows[:50], fit=40, calibrate=30, max_per_label=None, seed=0)
    assert (len(fit), len(held)) == (40 - 8, 10 + 8) and not set(fit) & set(held)  # a fifth lent


def test_predict_without_a_task_prints_a_question_mark_for_a_text_of_no_known_task(tmp_path, task_dirs, capsys):
    from safetensors.torch import save_file

    _train(tmp_path, task_dirs, train={"epochs": 1})
    stored = tmp_path / "run" / "checkpoint" / "adapters" / "task-router.safetensors"
    tensors = load_file(stored)
    far = {k: torch.tensor(0.0, dtype=torch.float64) if k.endswith(".threshold") else v for k, v in tensors.items()}
    save_file(far, stored)  # every task now refuses every text: each answer must say so, not guess
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "run"), "review train 1 charlie: good good good"]) == 0
    assert capsys.readouterr().out == "?\t\n"
    assert main(["predict", "--model", str(tmp_path / "run"), "--task", "sentiment", "review good good"]) == 0
    assert capsys.readouterr().out.strip() in {"bad", "good"}  # a told task is never refused


def test_predict_without_a_task_refuses_a_text_laid_out_unlike_every_known_task(tmp_path, capsys):
    tasks = {"topics": write_task(tmp_path / "data" / "topics", ["sports", "science", "politics"], (24, 2)),
             "animals": write_task(tmp_path / "data" / "animals", ["cat", "dog", "bird", "fish"], (24, 2), salt="pet ")}
    _train(tmp_path, tasks, train={"epochs": 1}, router={"fit_per_task": 16, "calibrate_per_task": 24})
    stored = load_file(tmp_path / "run" / "checkpoint" / "adapters" / "task-router.safetensors")
    assert {"topics.layouts", "animals.layouts"} <= stored.keys()  # both free text, enough held out to tell
    capsys.readouterr()
    text = "pet train 1 golf: cat cat cat cat cat cat"  # an animals training text
    assert main(["predict", "--model", str(tmp_path / "run"), text]) == 0
    assert capsys.readouterr().out.split("\t")[0] == "animals"
    assert main(["predict", "--model", str(tmp_path / "run"), f"Title: pets\nText: {text}"]) == 0
    assert capsys.readouterr().out == "?\t\n"


def test_discriminator_only_steps_move_the_discriminators_and_nothing_else(tmp_path, task_dirs):
    """One step per stage (batch 32 > 18 rows): the second stage's joint step is the same, then two
    more steps of the discriminators alone on the features that step's forward produced."""
    two = {name: task_dirs[name] for name in ("topics", "sentiment")}
    for inner in (1, 3):
        _train(tmp_path, two, name=f"inner{inner}", adversarial={"inner_steps": inner, "lr": 0.05},
               train={"batch_size": 32, "epochs": 1}, memory={"per_task": 6, "per_batch": 3})
    for group in _adapters_groups(tmp_path / "inner1"):
        one, three = _adapters(tmp_path / "inner1", group), _adapters(tmp_path / "inner3", group)
        for key in one:
            moved = not torch.equal(one[key], three[key])
            assert moved == (".discriminator." in key), (group, key)


def test_inc_lora_warm_starts_each_task_from_the_previous_tasks_final_adapter(tmp_path, task_dirs):
    two = {name: task_dirs[name] for name in ("topics", "sentiment")}
    seen = {}
    _train(tmp_path, {"topics": task_dirs["topics"]}, name="run", method="inc-lora-warm")
    seen["topics"] = _adapters(tmp_path / "run", "expert-topics")
    trainer = Trainer(load_config(write_config(tmp_path / "two.yaml", two, method="inc-lora-warm")), tmp_path / "run")
    trainer.on_checkpoint = lambda folder: None
    original = trainer.train_stage

    def before_training(stage, past, index):  # the new adapter as training finds it
        seen["start"] = {k: v.clone() for k, v in trainer.model.adapter_groups()["expert-sentiment"].items()}
        return original(stage, past, index)

    trainer.train_stage = before_training
    trainer.run(resume=True)
    as_topics = lambda tensors: {k.replace(".sentiment.", ".topics."): v for k, v in tensors.items()}  # noqa: E731
    start, final = as_topics(seen["start"]), as_topics(_adapters(tmp_path / "run", "expert-sentiment"))
    assert start.keys() == seen["topics"].keys()
    assert all(torch.equal(start[k], seen["topics"][k]) for k in start)
    assert any(not torch.equal(final[k], seen["topics"][k]) for k in final)  # then it trains
    kept = _adapters(tmp_path / "run", "expert-topics")
    assert all(torch.equal(kept[k], seen["topics"][k]) for k in kept)  # and the old one stays frozen


def test_inc_lora_r16_has_twice_the_rank_at_the_same_scale(tiny_model):
    plain, doubled = tiny_model("inc-lora"), tiny_model("inc-lora-r16")
    for model in (plain, doubled):
        model.add_task("a", ["x", "y"])
    a, b = plain.wrapped[0].experts["a"]["up_proj"], doubled.wrapped[0].experts["a"]["up_proj"]
    assert b.A.shape[0] == 2 * a.A.shape[0] and b.scale == a.scale


def test_a_model_whose_experts_add_nothing_answers_as_the_bare_backbone(tiny_model):
    from moecl.model import BARE_BACKBONE
    from moecl.prompts import TaskPrompt
    from moecl.scoring import label_scores

    model = tiny_model("moecl")
    model.add_task("a", ["yes", "no"])
    model.eval()
    assert model.scoring_digest("a") == BARE_BACKBONE  # fresh: every LoRA's B is zero
    prompt = TaskPrompt(model.tokenizer, "a", ["yes", "no"], 64)
    texts = ["one two three", "four five six seven"]
    fresh = label_scores(model, prompt, texts, 2)
    model.routing.bypass = True
    bare = label_scores(model, prompt, texts, 2)
    model.routing.bypass = False
    assert torch.equal(fresh, bare)
    with torch.no_grad():
        model.wrapped[0].experts["a"]["up_proj"].B.add_(0.1)
    assert model.scoring_digest("a") != BARE_BACKBONE


def test_the_adversarial_weight_ramps_up_over_each_stages_first_steps(tmp_path, task_dirs, monkeypatch):
    from moecl.model import ContinualModel

    two = {name: task_dirs[name] for name in ("topics", "sentiment")}  # 18 and 12 rows: 5 and 3 steps of 4
    weights, route = [], ContinualModel.route

    def recording(self, tasks, text_mask=None, adversarial_weight=0.0):
        if text_mask is not None:  # a training step (scoring routes without a text mask)
            weights.append(adversarial_weight)
        return route(self, tasks, text_mask, adversarial_weight)

    monkeypatch.setattr(ContinualModel, "route", recording)
    _train(tmp_path, two, adversarial={"weight": 0.2, "ramp_steps": 4}, train={"epochs": 1})
    assert weights == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.05, 0.1, 0.15])
