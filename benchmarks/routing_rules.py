"""Which refusal rule could refuse texts of a task never learned: variants of the router's rule on
the same texts, leave one task out.

`benchmarks/routing.py` measures the shipped rule (last layer, linear discriminant, per-task
shrunk Mahalanobis distance, acceptance at a held-out quantile). This script asks whether another
feature or distance would do better: every layer's state of the bare backbone, pooled three ways, is
computed once for routing.py's texts (kept under --cache, so rules are compared without a second
forward), then for each variant and each MTL5 task left out: the share of its test texts refused,
and the lowest share of the four known tasks' test texts routed right (the target: at least 80%
refused while every known task keeps 95%).

Variants: the shipped rule on another layer (`layer`), on several layers side by side (`layers`),
with another shrinkage (`shrinkage`), fitted on fewer texts (`fit`), with the relative Mahalanobis
distance (`relative`), with the state of the text's first tokens or its last token beside the mean
(`opening`, `last`), the mean or max of several (layer, pooling) parts' standardised distances
(`ensemble`), and a
k-nearest-neighbour cosine distance to the task's fit texts on
centred, normalised features of one or several layers (`knn`, routed to the nearest task).

    python benchmarks/routing_rules.py [--cache runs/routing-rules/features.pt]

Prints a table, writes benchmarks/results/routing-rules.json.
"""
from __future__ import annotations

import argparse
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import moecl.task_router as task_router
from moecl.prompts import special_prefix

from precision import cpu  # noqa: E402  (benchmarks/ is the script's folder)
from routing import TASKS, cached_features, text_arguments

Features = dict[str, dict[str, torch.Tensor]]  # task -> fit/held/test -> (texts, layers + 1, POOLINGS, hidden)


POOLINGS = ("mean", "opening", "last")  # over every token / the first OPENING tokens of the text / its last token
OPENING = 4


@torch.no_grad()
def every_layer(model, texts: list[str], budget: int, batch_size: int = 16) -> torch.Tensor:
    """(texts, layers + 1, POOLINGS, hidden): each layer's state (embeddings first, the normed last
    state last) pooled three ways over the text's tokens, bare backbone: the shipped features are
    [:, -1, 0]. The opening reads the layout (which fields a text starts with), the last token what
    a causal model has read of the whole text."""
    rows = []
    skip = len(special_prefix(model.tokenizer))
    model.routing.bypass = True
    try:
        for input_ids, mask in task_router.padded_batches(model, texts, budget, batch_size):
            states = model.backbone.base_model(input_ids=input_ids, attention_mask=mask,
                                               output_hidden_states=True).hidden_states
            opening = torch.zeros_like(mask)
            opening[:, skip: skip + OPENING] = 1
            last = mask.sum(1) - 1
            rows.append(torch.stack([torch.stack([task_router.mean_pool(h, mask), task_router.mean_pool(h, opening * mask),
                                                  h[torch.arange(len(h)), last].double()], 1)
                                     for h in states], 1).float().cpu())
    finally:
        model.routing.bypass = False
    return torch.cat(rows)


@contextmanager
def shrinkage(value: float):
    """The router's shrinkage toward the identity set to `value` (it is read when fitting and when routing)."""
    saved, task_router.SHRINKAGE = task_router.SHRINKAGE, value
    try:
        yield
    finally:
        task_router.SHRINKAGE = saved


def shipped_rule(features: Features, known: list[str], layers: list[int], accept: float, shrink: float,
                 fit: int | None = None, relative: bool = False, poolings: tuple[str, ...] = ("mean",)):
    """The router's own rule on one layer's features (or several layers' side by side), fitted on
    the first `fit` fit texts of each task (all by default): task -> predict(split) giving a task or
    None per text. `relative`: the distance is the task's Mahalanobis distance minus that under
    one Gaussian of every known task's fit texts (Ren et al. 2021, arXiv 2106.09022), so directions
    along which every known text varies count for less than those that set the task apart."""
    def rows(task: str, split: str) -> torch.Tensor:
        chosen = features[task][split][:, layers][:, :, [POOLINGS.index(p) for p in poolings]].flatten(1)
        return chosen[:fit] if split == "fit" else chosen

    router, background = task_router.TaskRouter(), task_router.TaskRouter()
    with shrinkage(shrink):
        for task in known:
            router.fit(task, rows(task, "fit"))
        if relative:
            background.fit("known", torch.cat([rows(t, "fit") for t in known]))

    def distance(task: str, x: torch.Tensor) -> torch.Tensor:
        own = router.distance(task, x)
        return own - background.distance("known", x) if relative else own

    with shrinkage(shrink):
        limits = {t: torch.quantile(distance(t, rows(t, "held")), accept) for t in known}

    def predict(task: str) -> list[str | None]:
        x = rows(task, "test")
        with shrinkage(shrink):
            routed = router.predict(x, refuse=False)
            far = torch.stack([distance(t, x) > limits[t] for t in known], 1)
        return [None if far[i, known.index(t)] else t for i, t in enumerate(routed)]

    return predict


def ensemble_rule(features: Features, known: list[str], parts: list[tuple[int, str]], accept: float,
                  combine: str = "mean"):
    """Routed by the shipped rule on the last layer; refused on each (layer, pooling) part's log
    Mahalanobis distance to the routed task, standardised by that task's held-out texts (every
    part on one scale, so no part's dimension or spread outweighs another's), combined by their
    `combine` ("mean", or "max": refused when any part finds the text far), beyond the `accept`
    quantile of the held-out texts' combined score (the quantile of the max pays for the many tests)."""
    last = features[known[0]]["fit"].shape[1] - 1
    keys = [(layer, POOLINGS.index(pooling)) for layer, pooling in parts]
    per_part = {key: task_router.TaskRouter() for key in {*keys, (last, 0)}}
    for (layer, pooling), router in per_part.items():
        for task in known:
            router.fit(task, features[task]["fit"][:, layer, pooling])

    def log_distance(task: str, key: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
        return per_part[key].distance(task, rows[:, key[0], key[1]]).log()

    scale = {(t, key): (d.mean(), d.std()) for t in known for key in keys
             for d in [log_distance(t, key, features[t]["held"])]}

    def score(task: str, rows: torch.Tensor) -> torch.Tensor:
        z = torch.stack([(log_distance(task, key, rows) - scale[task, key][0]) / scale[task, key][1] for key in keys])
        return z.mean(0) if combine == "mean" else z.max(0).values

    limits = {t: torch.quantile(score(t, features[t]["held"]), accept) for t in known}

    def predict(task: str) -> list[str | None]:
        rows = features[task]["test"]
        routed = per_part[last, 0].predict(rows[:, last, 0], refuse=False)
        far = torch.stack([score(t, rows) > limits[t] for t in known], 1)
        return [None if far[i, known.index(t)] else t for i, t in enumerate(routed)]

    return predict


def knn_rule(features: Features, known: list[str], layers: list[int], k: int, accept: float):
    """Nearest task by the cosine distance to its k-th nearest fit text, refused beyond the
    `accept` quantile of that distance over the task's held-out texts."""
    centre = {layer: torch.cat([features[t]["fit"][:, layer, 0] for t in known]).double().mean(0) for layer in layers}

    def embed(task: str, split: str) -> torch.Tensor:
        parts = [F.normalize(features[task][split][:, layer, 0].double() - centre[layer], dim=-1) for layer in layers]
        return F.normalize(torch.cat(parts, -1), dim=-1)

    banks = {t: embed(t, "fit") for t in known}

    def distance(x: torch.Tensor, task: str) -> torch.Tensor:
        return 1 - (x @ banks[task].T).topk(k, dim=-1).values[:, -1]

    limits = {t: torch.quantile(distance(embed(t, "held"), t), accept) for t in known}

    def predict(task: str) -> list[str | None]:
        x = embed(task, "test")
        distances = torch.stack([distance(x, t) for t in known], 1)
        nearest, best = distances.argmin(1).tolist(), distances.min(1).values.tolist()
        return [known[i] if d <= limits[known[i]] else None for i, d in zip(nearest, best)]

    return predict


def leave_one_out(features: Features, build) -> dict:
    result = {}
    for stranger in TASKS:
        known = [t for t in TASKS if t != stranger]
        predict = build(known)
        refused = predict(stranger).count(None) / len(features[stranger]["test"])
        right = {t: predict(t).count(t) / len(features[t]["test"]) for t in known}
        result[stranger] = {"refused": refused, "known_routed_right_min": min(right.values())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    text_arguments(parser)
    parser.set_defaults(cache=Path("runs/routing-rules/features.pt"))
    parser.add_argument("--json", default="benchmarks/results/routing-rules.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    features = cached_features(args, lambda model, texts: every_layer(model, texts, args.max_length),
                               f"every layer, {POOLINGS}, opening {OPENING}")
    fitted, last = next(iter(features.values()))["fit"].shape[:2]
    last -= 1
    variants = {}
    for accept in (0.95, 0.99):
        for layer in (last, last - 1, 24, 20, 16, 12, 8):
            variants[f"layer {layer}, q{accept}"] = lambda known, l=layer, a=accept: shipped_rule(
                features, known, [l], a, task_router.SHRINKAGE)
        for shrinkage in (0.01, 0.03, 0.3, 0.6, 0.9):
            variants[f"layer {last}, shrinkage {shrinkage}, q{accept}"] = lambda known, s=shrinkage, a=accept: shipped_rule(
                features, known, [last], a, s)
        for fit in sorted({256, fitted // 2} - {fitted}):
            variants[f"layer {last}, fit {fit}, q{accept}"] = lambda known, f=fit, a=accept: shipped_rule(
                features, known, [last], a, task_router.SHRINKAGE, fit=f)
        for layers in ([last], [20], [16, last], [8, 16, 24, last]):
            variants[f"relative, layers {','.join(map(str, layers))}, q{accept}"] = lambda known, ls=layers, a=accept: shipped_rule(
                features, known, ls, a, task_router.SHRINKAGE, relative=True)
        for layers in ([16, last], [8, 16, 24, last]):
            variants[f"layers {','.join(map(str, layers))}, q{accept}"] = lambda known, ls=layers, a=accept: shipped_rule(
                features, known, ls, a, task_router.SHRINKAGE)
        for poolings in (("opening",), ("mean", "opening"), ("mean", "last"), ("mean", "opening", "last")):
            for layers in ([last], [16, last]):
                variants[f"{'+'.join(poolings)}, layers {','.join(map(str, layers))}, q{accept}"] = (
                    lambda known, ls=layers, a=accept, p=poolings: shipped_rule(
                        features, known, ls, a, task_router.SHRINKAGE, poolings=p))
            variants[f"relative, {'+'.join(poolings)}, layer {last}, q{accept}"] = (
                lambda known, a=accept, p=poolings: shipped_rule(
                    features, known, [last], a, task_router.SHRINKAGE, relative=True, poolings=p))
        every_other = list(range(last % 2 or 2, last + 1, 2))
        for combine, layers, poolings in (("mean", [last - 1, last], ["mean"]), ("mean", [20, last], ["mean"]),
                                          ("mean", [16, 20, 24, last - 1, last], ["mean"]), ("mean", every_other, ["mean"]),
                                          ("mean", [15, last], ["mean", "opening"]), ("max", [20, last], ["mean"]),
                                          ("max", [10, 20, last], ["mean", "opening"]), ("max", every_other, ["mean", "opening"])):
            parts = [(layer, pooling) for layer in layers for pooling in poolings]
            variants[f"ensemble {combine}, {'+'.join(poolings)}, layers {','.join(map(str, layers))}, q{accept}"] = (
                lambda known, ps=parts, a=accept, c=combine: ensemble_rule(features, known, ps, a, c))
    for layers in ([last], [20], [16, last], [8, 16, 24, last]):
        for k in (1, 5):
            variants[f"knn k={k} layers {','.join(map(str, layers))}, q0.95"] = lambda known, ls=layers, kk=k: knn_rule(
                features, known, ls, kk, 0.95)
    results = {}
    name, _ = cpu()
    print(f"\nleave one task out; refused: the left-out task's test texts; known: lowest share of a known task "
          f"routed right ({name})\n\n| variant | " + " | ".join(f"{t} refused" for t in TASKS)
          + " | mean refused | known routed right (lowest) |\n|---|" + "---|" * (len(TASKS) + 2))
    for label, build in variants.items():
        rows = leave_one_out(features, build)
        mean = sum(r["refused"] for r in rows.values()) / len(rows)
        known = min(r["known_routed_right_min"] for r in rows.values())
        results[label] = {"tasks": rows, "mean_refused": mean, "known_routed_right_min": known}
        print(f"| {label} | " + " | ".join(f"{100 * rows[t]['refused']:.1f}" for t in TASKS)
              + f" | {100 * mean:.1f} | {100 * known:.1f} |", flush=True)
    meets = [v for v, r in results.items() if min(x["refused"] for x in r["tasks"].values()) >= 0.8
             and r["known_routed_right_min"] >= 0.95]
    print(f"\nvariants meeting the target (every left-out task >= 80% refused, known >= 95%): {meets or 'none'}")
    Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cpu": name,
                                           "variants": results, "meeting_target": meets}, indent=2))


if __name__ == "__main__":
    main()
