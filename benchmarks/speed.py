"""Train-step time of MoE-CL against one plain peft LoRA on the same targets, batch and process,
with tokens/s, peak memory and model FLOPs utilisation (MFU) per variant.

Every variant runs the same loss (answer tokens only) and an AdamW step; the variants take turns
step by step, so machine noise falls on all of them alike. Prints a markdown table, writes JSON.
Besides the real SmolLM2, `--shape` builds a random-init Llama-architecture model of about 1B or
7B parameters directly on the device (speed and memory do not depend on the weights' values).

    python benchmarks/speed.py [--shape smollm2-135m] [--batch 8] [--length 128] [--steps 8]
    python benchmarks/speed.py --shape llama-7b --device cuda --precision bf16 --gradient-checkpointing \
        --batch 8 --length 512 --out benchmarks/results/speed-gpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import contextlib
import resource

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from moecl.backbone import DTYPES, SMOLLM2, backbone_path, load_backbone, resolve_device, set_special_tokens
from moecl.config import LoraConfig
from moecl.data import load_task, per_label
from moecl.experts import SHARED
from moecl.model import ContinualModel, answer_loss
from moecl.prompts import TaskPrompt

DATA = Path(__file__).resolve().parents[1] / "samples" / "mtl5"
# Llama-architecture shapes (TinyLlama-1.1B, Llama-2-7B) with SmolLM2's tokenizer and vocabulary.
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
}
# Dense bf16 peak TFLOP/s by device name (vendor data sheets), for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0,
               "L4": 121.0}


def build_backbone(shape: str, device: torch.device, precision: str, tokenizer_path: str | None = None):
    """(model, tokenizer): the real SmolLM2, or a random-init model of a named shape, frozen.
    `tokenizer_path`: a folder holding SmolLM2's tokenizer (default: the converted backbone's)."""
    if shape == "smollm2-135m":
        return load_backbone(SMOLLM2, str(device), precision)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or backbone_path(SMOLLM2))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[precision])
    set_special_tokens(tokenizer, model)
    model.requires_grad_(False)
    return model, tokenizer


def model_flops_per_token(model, length: int) -> float:
    """Forward plus the backward's input gradients (the frozen weights get none): twice the forward's
    2 x (non-embedding) parameters + attention (4 x layers x length x hidden). The answer-only loss
    projects few tokens on the vocabulary, so the (tied) output head is counted as if every token
    were; recomputation under gradient checkpointing is not counted (it is hardware, not model, FLOPs)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()  # lookups
    forward = 2 * params + 4 * cfg.num_hidden_layers * length * cfg.hidden_size
    return 2 * forward


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def fixed_batch(tokenizer, size: int, length: int, device: torch.device):
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
    input_ids = torch.tensor(ids, device=device)
    return (input_ids, (input_ids != tokenizer.pad_token_id).long(), torch.tensor(labels, device=device),
            torch.tensor(text, device=device))


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
    parser.add_argument("--shape", choices=["smollm2-135m", *SHAPES], default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=list(DTYPES), default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: known GPUs only)")
    parser.add_argument("--tokenizer", help="folder with SmolLM2's tokenizer, for the random shapes where the "
                                            "backbone is not installed (benchmarks/device.sh)")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    lora = LoraConfig()  # r=8, alpha=16, dropout=0.05 on gate/up/down

    backbone, tokenizer = build_backbone(args.shape, device, args.precision, args.tokenizer)
    batch = fixed_batch(tokenizer, args.batch, args.length, device)
    flops_per_step = model_flops_per_token(backbone, args.length) * args.batch * args.length
    backbone_parameters = sum(p.numel() for p in backbone.parameters())
    moecl = ContinualModel(backbone, tokenizer, "moecl", lora, precision=args.precision)
    moecl.add_task("first", ["a"])
    moecl.add_task("second", ["a"])
    second = moecl.prepare_training(["second"])
    per_task = count(p for m in moecl.wrapped for p in [*m.experts["second"].parameters(), *m.gates["second"].parameters()])
    disc_row = sum(m.discriminator.in_features + 1 for m in moecl.ffn_modules())
    shared = count(p for m in moecl.wrapped for p in m.experts[SHARED].parameters())
    gate = count(p for m in moecl.wrapped for p in m.gates["second"].parameters())

    plain_backbone, _ = build_backbone(args.shape, device, args.precision, args.tokenizer)
    peft_model = get_peft_model(plain_backbone, PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets))
    for param in peft_model.parameters():  # fp32 master weights for the adapters, as moecl keeps them
        if param.requires_grad:
            param.data = param.data.float()
    causal_lm = peft_model.base_model.model
    if args.gradient_checkpointing:
        for model in (backbone, causal_lm):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = (contextlib.nullcontext() if args.precision == "fp32"
                else torch.autocast(device.type, dtype=DTYPES[args.precision]))

    n_first = args.batch - args.batch // 4  # a task-2 batch: 3/4 current rows, 1/4 memory of task 1
    variants = {
        "peft LoRA": (lambda: answer_loss(causal_lm.base_model, causal_lm.get_output_embeddings(), *batch[:3]),
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
    moecl.train()
    peft_model.train()
    times: dict[str, list[float]] = {name: [] for name in variants}
    peak_memory: dict[str, int] = {}
    for step in range(args.steps + 2):  # the first two rounds warm up
        for name, (loss_fn, _) in variants.items():
            if name.startswith("moecl"):
                moecl.prepare_training(["first"] if "first" in name else ["second"])
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            with autocast:
                loss = loss_fn()
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if cuda:
                torch.cuda.synchronize(device)
                peak_memory[name] = torch.cuda.max_memory_allocated(device)
            if step >= 2:
                times[name].append(time.perf_counter() - start)
        print(f"round {step + 1}/{args.steps + 2}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items() if t), flush=True)

    peak = peak_tflops(device, args.peak_tflops)
    base = statistics.median(times["peft LoRA"])
    rows = []
    for name, t in times.items():
        median = statistics.median(t)
        rows.append({"variant": name, "median_s": median, "ratio_to_peft": median / base, "steps": len(t),
                     "tokens_per_s": args.batch * args.length / median,
                     "peak_memory_gib": peak_memory[name] / 2**30 if cuda else None,
                     "mfu": flops_per_step / median / (peak * 1e12) if peak else None})
    params = {"backbone": backbone_parameters, "dedicated_expert_and_gate_per_task": per_task, "of_which_gate": gate,
              "discriminator_row_per_task": disc_row, "added_per_task": per_task + disc_row, "shared_expert": shared,
              "peft_lora": count(p for p in peft_model.parameters() if p.requires_grad)}
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.shape} ({params['backbone'] / 1e9:.2f}B), {args.precision}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, batch {args.batch} x {args.length} "
          f"tokens, {device_name}, median of {args.steps} steps; process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB\n")
    print("| variant | median step (s) | ratio to peft LoRA | tokens/s | peak GPU memory (GiB) | MFU |\n|---|---|---|---|---|---|")
    for row in rows:
        memory = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"| {row['variant']} | {row['median_s']:.3f} | {row['ratio_to_peft']:.2f} | {row['tokens_per_s']:.0f} | "
              f"{memory} | {mfu} |")
    print("\n| trainable parameters | count |\n|---|---|")
    for name, value in params.items():
        print(f"| {name} | {value:,} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": args.shape, "device": device_name, "precision": args.precision,
                               "gradient_checkpointing": args.gradient_checkpointing, "batch": args.batch,
                               "length": args.length, "peak_tflops": peak, "model_flops_per_step": flops_per_step,
                               "rows": rows, "parameters": params}, indent=2))


if __name__ == "__main__":
    main()
