"""The command-line contract: bad config or data fails before training, naming file and problem."""
from __future__ import annotations

import json

import pytest
import yaml

from moecl.cli import main
from tests.conftest import write_config


def _run(tmp_path, config, capsys) -> tuple[int, str]:
    code = main(["train", str(config), "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


def test_unknown_key_names_file_and_key(tmp_path, task_dirs, capsys):
    config = write_config(tmp_path / "c.yaml", task_dirs, train={"epoch": 3})
    code, err = _run(tmp_path, config, capsys)
    assert code == 2 and str(config) in err and "train.epoch" in err
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_rejected(tmp_path, task_dirs, capsys):
    code, err = _run(tmp_path, write_config(tmp_path / "c.yaml", task_dirs, method="ewc"), capsys)
    assert code == 2 and "method 'ewc'" in err


def test_missing_data_file_is_named(tmp_path, task_dirs, capsys):
    (task_dirs["sentiment"] / "test.jsonl").unlink()
    code, err = _run(tmp_path, write_config(tmp_path / "c.yaml", task_dirs), capsys)
    assert code == 2 and str(task_dirs["sentiment"] / "test.jsonl") in err and "not found" in err


def test_label_outside_labels_json_names_file_and_line(tmp_path, task_dirs, capsys):
    train = task_dirs["animals"] / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[4] = json.dumps({"text": "a hamster", "label": "hamster"})
    train.write_text("\n".join(lines) + "\n")
    code, err = _run(tmp_path, write_config(tmp_path / "c.yaml", task_dirs), capsys)
    assert code == 2 and f"{train}:5" in err and "'hamster' is not in labels.json" in err
    assert not (tmp_path / "out").exists()


def test_empty_split_is_rejected(tmp_path, task_dirs, capsys):
    (task_dirs["topics"] / "train.jsonl").write_text("")
    code, err = _run(tmp_path, write_config(tmp_path / "c.yaml", task_dirs), capsys)
    assert code == 2 and "train.jsonl: the split is empty" in err


def test_shipped_configs_parse():
    from pathlib import Path

    from moecl.config import load_config
    from moecl.methods import DEFAULT

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert len(configs) >= 4
    for path in configs:  # the quick first run trains the default; the MTL5 orders, the paper's method
        cfg = load_config(path)
        assert cfg.tasks and cfg.method == (DEFAULT if path.stem == "demo" else "moecl")
    orders = {p.stem: [t.name for t in load_config(p).tasks] for p in configs if "order" in p.stem}
    assert orders["mtl5-order1"] == ["dbpedia", "amazon", "yahoo", "agnews"]


@pytest.mark.parametrize("bad", [{"tasks": []}, {"lora": {"targets": ["q_proj"]}}, {"train": {"lr": -1}},
                                 {"train": {"lr": "fast"}}])
def test_invalid_values_are_rejected(tmp_path, task_dirs, capsys, bad):
    config = write_config(tmp_path / "c.yaml", task_dirs)
    raw = yaml.safe_load(config.read_text())
    raw.update(bad)
    config.write_text(yaml.safe_dump(raw))
    code, err = _run(tmp_path, config, capsys)
    assert code == 2 and str(config) in err
