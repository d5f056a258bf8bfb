"""Device, precision and activation checkpointing on the CPU: bf16 and fp16 train with fp32 adapter
weights; checkpointing recomputes the same gradients; the expert injection is not Llama-only."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from moecl.backbone import TINY_LLAMA, backbone_path
from moecl.config import load_config
from moecl.trainer import Trainer
from tests.conftest import write_config


def _trainer(tmp_path, task_dirs, name: str, **overrides) -> Trainer:
    return Trainer(load_config(write_config(tmp_path / f"{name}.yaml", task_dirs, **overrides)), tmp_path / name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_with_fp32_adapters_to_fp32s_accuracy(tmp_path, task_dirs, precision):
    topics = {"topics": task_dirs["topics"]}
    settings = {"method": "seq-lora", "train": {"epochs": 8, "lr": 0.01, "device": "cpu"}}
    full = _trainer(tmp_path, topics, "fp32", **settings).run()
    trainer = _trainer(tmp_path, topics, precision, **{**settings, "train": {**settings["train"], "precision": precision}})
    half = trainer.run()
    model = trainer.model
    assert model.backbone.get_input_embeddings().weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert all(p.dtype == torch.float32 for m in model.wrapped for n, p in m.named_parameters() if not n.startswith("base."))
    assert abs(half["accuracy_matrix"][0][0] - full["accuracy_matrix"][0][0]) <= 1 / 9 + 1e-9  # one test example of 9
    assert half["accuracy_matrix"][0][0] > 1 / 3


def test_moecl_with_its_discriminator_runs_in_bf16(tmp_path, task_dirs):
    metrics = _trainer(tmp_path, task_dirs, "bf16", train={"epochs": 1, "precision": "bf16", "device": "cpu"}).run()
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
    assert all(0.0 <= s["disc_acc"] <= 1.0 for s in metrics["training"][1:])



def test_logits_and_the_discriminator_stay_fp32_under_bf16(tmp_path, task_dirs):
    """The scores scoring ranks and the losses training subtracts: fp32 under bf16 autocast, and
    closer to the fp32 model's logits than the bf16 head's rounding."""
    trainer = _trainer(tmp_path, task_dirs, "bf16", train={"precision": "bf16", "device": "cpu"})
    model = trainer.model
    model.add_task("topics", ["sports", "science", "politics"])
    model.add_task("sentiment", ["bad", "good"])
    ids = torch.randint(0, 100, (4, 12))
    mask = torch.ones_like(ids)
    model.route(["topics", "sentiment"] * 2, text_mask=mask, adversarial_weight=0.1)
    with model.autocast():
        hidden = model.hidden_states(ids, mask)
        logits = model.vocabulary_logits(hidden)
        rounded = model.backbone.get_output_embeddings()(hidden)  # the bf16 head
        disc_loss, _ = model.discriminator_loss()
    assert logits.dtype == disc_loss.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert all(d.dtype == torch.float32 for d in model.routing.disc_logits)
    exact = hidden.float() @ model.backbone.get_output_embeddings().weight.float().T
    assert torch.allclose(logits, exact, atol=1e-4, rtol=0)
    assert (rounded.float() - exact).abs().max() > (logits - exact).abs().max()


def test_the_discriminator_reads_the_shared_experts_small_contribution_accurately_in_bf16(tmp_path, task_dirs):
    """What the discriminator reads is the shared expert's FFN state minus the base FFN's: a small
    difference of two large states. Under bf16 it is taken in fp32, so it stays within a few percent
    of the fp32 model's (rounding both states to bf16 first would leave mostly rounding noise)."""
    pooled = {}
    for precision in ("fp32", "bf16"):
        model = _trainer(tmp_path, task_dirs, precision, train={"precision": precision, "device": "cpu"}).model
        torch.manual_seed(0)  # the same adapters in both
        model.add_task("topics", ["sports", "science", "politics"])
        model.add_task("sentiment", ["bad", "good"])
        for module in model.ffn_modules():  # a trained-looking shared expert, adding 1e-3 of the base state
            for lora in module.experts["shared"].values():
                lora.B.data.normal_(0, 1e-3)
        ids = torch.randint(0, 100, (4, 12))
        model.route(["topics", "sentiment"] * 2, text_mask=torch.ones_like(ids), adversarial_weight=0.1)
        with torch.no_grad(), model.autocast():
            model.hidden_states(ids, torch.ones_like(ids))
        pooled[precision] = torch.stack(model.routing.disc_inputs)
    assert pooled["bf16"].dtype == torch.float32
    error = (pooled["bf16"] - pooled["fp32"]).norm() / pooled["fp32"].norm()
    assert 0 < error < 0.05

def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, task_dirs):
    grads = []
    for checkpointing in (False, True):
        trainer = _trainer(tmp_path, task_dirs, f"ckpt{checkpointing}", train={"gradient_checkpointing": checkpointing})
        model = trainer.model
        torch.manual_seed(0)  # the same adapters both times
        for task in trainer.tasks[:2]:
            model.add_task(task.name, task.labels)
        model.prepare_training(["sentiment"])
        model.train()
        rows = trainer.tasks[1].train[:3] + trainer.tasks[0].train[:1]
        loss, _ = trainer._step_loss(rows, [], "sentiment", {})
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_experts_are_injected_into_a_qwen2_backbone(tmp_path, task_dirs):
    folder = tmp_path / "tiny-qwen2"
    tokenizer = AutoTokenizer.from_pretrained(backbone_path(TINY_LLAMA))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.1)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trainer = _trainer(tmp_path, task_dirs, "qwen2", backbone=str(folder), train={"epochs": 1})
    metrics = trainer.run()
    assert type(trainer.model.backbone).__name__ == "Qwen2ForCausalLM"
    assert len(trainer.model.ffn_modules()) == 2  # one expert-carrying FFN per layer
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(tmp_path):
    import torch

    from moecl.backbone import resolve_precision

    amx, avx512, plain = tmp_path / "amx", tmp_path / "avx512", tmp_path / "plain"
    amx.write_text("flags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n")
    avx512.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")  # bf16 dot products, no AMX tiles
    plain.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, amx) == "bf16"
    assert resolve_precision("auto", cpu, avx512) == "bf16"
    assert resolve_precision("auto", cpu, plain) == "fp32"
    assert resolve_precision("auto", cpu, tmp_path / "no-such-file") == "fp32"
    assert resolve_precision("fp16", cpu, amx) == "fp16"  # an explicit choice is kept


def test_a_run_with_auto_precision_records_the_precision_it_ran_in(tmp_path, task_dirs):
    from moecl.backbone import cpu_has_bf16

    cfg = load_config(write_config(tmp_path / "auto.yaml", {"topics": task_dirs["topics"]}, train={"precision": "auto"}))
    trainer = Trainer(cfg, tmp_path / "run")
    expected = "bf16" if cpu_has_bf16() else "fp32"
    assert trainer.cfg.train.precision == trainer.model.precision == expected
