"""Train-step time of MoE-CL against one plain peft LoRA on the same targets, batch and process.

Every variant runs the same loss (answer tokens only) and an AdamW step; the variants take turns
step by step, so machine noise falls on all of them alike. Prints a markdown table, writes JSON.

    python benchmarks/speed.py [--backbone smollm2-135m-instruct] [--batch 8] [--length 128] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from moecl.backbone import load_backbone
from moecl.config import LoraConfig
from moecl.data import load_task, per_label
from moecl.experts import SHARED
from moecl.model import ContinualModel, answer_loss
from moecl.prompts import TaskPrompt

DATA = Path(__file__).resolve().parents[1] / "samples" / "mtl5"


def fixed_batch(tokenizer, size: int, length: int):
    """`size` real training sequences, cut or padded to exactly `length` tokens."""
    task = load_task("dbpedia", DATA / "dbpedia")
    prompt = TaskPrompt(tokenizer, task.name, task.labels, max_length=length)
    examples = per_label(task.train, None, seed=0)[:size]
    ids, labels, text = [], [], []
    for example in examples:
        encoded = prompt.training_pair(example)
        filler = length - len(encoded.ids)
        ids.append(encoded.ids + [tokenizer.pad_token_id] * filler)
        labels.append(encoded.labels + [-100] * filler)
        text.append([1] * encoded.text_length + [0] * (length - encoded.text_length))
    input_ids = torch.tensor(ids)
    return input_ids, (input_ids != tokenizer.pad_token_id).long(), torch.tensor(labels), torch.tensor(text)


def moecl_step(model: ContinualModel, batch, tasks: list[str]):
    """A first task trains without the discriminator (one task to tell apart); later ones with it."""
    ids, mask, labels, text = batch
    model.route(tasks, text_mask=text if "second" in tasks else None, adversarial_weight=0.1)
    loss = model.lm_loss(ids, mask, labels)
    if model.routing.disc_labels is not None:
        loss = loss + model.discriminator_loss()[0]
    return loss


def count(params) -> int:
    return sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    lora = LoraConfig()  # r=8, alpha=16, dropout=0.05 on gate/up/down

    backbone, tokenizer = load_backbone(args.backbone)
    batch = fixed_batch(tokenizer, args.batch, args.length)
    moecl = ContinualModel(backbone, tokenizer, "moecl", lora)
    moecl.add_task("first", ["a"])
    moecl.add_task("second", ["a"])
    second = moecl.prepare_training(["second"])
    per_task = count(p for m in moecl.wrapped for p in [*m.experts["second"].parameters(), *m.gates["second"].parameters()])
    disc_row = sum(m.discriminator.in_features + 1 for m in moecl.ffn_modules())
    shared = count(p for m in moecl.wrapped for p in m.experts[SHARED].parameters())
    gate = count(p for m in moecl.wrapped for p in m.gates["second"].parameters())

    plain_backbone, _ = load_backbone(args.backbone)
    peft_model = get_peft_model(plain_backbone, PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets))
    causal_lm = peft_model.base_model.model

    n_first = args.batch - args.batch // 4  # a task-2 batch: 3/4 current rows, 1/4 memory of task 1
    variants = {
        "peft LoRA": (lambda: answer_loss(causal_lm, *batch[:3]),
                      [p for p in peft_model.parameters() if p.requires_grad]),
        "moecl, first task": (lambda: moecl_step(moecl, batch, ["first"] * args.batch), None),
        "moecl, later task + discriminator": (
            lambda: moecl_step(moecl, batch, ["second"] * n_first + ["first"] * (args.batch - n_first)), second),
    }
    optimizers = {}
    for name, (_, params) in variants.items():
        if params is None:
            params = moecl.prepare_training(["first"])
        optimizers[name] = torch.optim.AdamW(params, lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.steps + 2):  # the first two rounds warm up
        for name, (loss_fn, _) in variants.items():
            if name.startswith("moecl"):
                moecl.prepare_training(["first"] if "first" in name else ["second"])
            start = time.perf_counter()
            loss = loss_fn()
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
        print(f"round {step + 1}/{args.steps + 2}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items() if t), flush=True)

    base = statistics.median(times["peft LoRA"])
    rows = [{"variant": name, "median_s": statistics.median(t), "ratio_to_peft": statistics.median(t) / base,
             "steps": len(t)} for name, t in times.items()]
    params = {"dedicated_expert_and_gate_per_task": per_task, "of_which_gate": gate,
              "discriminator_row_per_task": disc_row, "added_per_task": per_task + disc_row, "shared_expert": shared,
              "peft_lora": count(p for p in peft_model.parameters() if p.requires_grad)}
    print(f"\nbackbone {args.backbone}, batch {args.batch} x {args.length} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps\n")
    print("| variant | median step (s) | ratio to peft LoRA |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['median_s']:.2f} | {row['ratio_to_peft']:.2f} |")
    print("\n| trainable parameters | count |\n|---|---|")
    for name, value in params.items():
        print(f"| {name} | {value:,} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backbone": args.backbone, "batch": args.batch, "length": args.length,
                               "threads": torch.get_num_threads(), "rows": rows, "parameters": params}, indent=2))


if __name__ == "__main__":
    main()
