"""The expert layer: exact mixing, gate normalisation, per-example routing, gradient reversal."""
from __future__ import annotations

import torch

from moecl.experts import SHARED, MoEFeedForward


def _randomise_adapters(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.wrapped:
            for name, param in module.named_parameters():
                if not name.startswith("base."):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _naive_expert_ffn(module: MoEFeedForward, expert: str, x: torch.Tensor) -> torch.Tensor:
    """The expert's whole LoRA-adapted FFN, run on its own (the official design)."""
    loras = module.experts[expert]
    base = module.base
    gate = base.gate_proj(x) + loras["gate_proj"](x)
    up = base.up_proj(x) + loras["up_proj"](x)
    hidden = base.act_fn(gate) * up
    return base.down_proj(hidden) + loras["down_proj"](hidden)


def test_gate_weights_are_a_distribution_per_token(tiny_model):
    model = tiny_model("moecl")
    model.add_task("a", ["x", "y"])
    _randomise_adapters(model)
    ffn = model.ffn_modules()[0]
    weights = ffn.mix_weights(torch.randn(3, 5, ffn.base.gate_proj.in_features))
    assert weights.shape == (3, 5, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 5), atol=1e-6)
    assert (weights > 0).all() and (weights < 1).all()
    assert weights.std() > 0  # a trained gate gives token-dependent mixes


def test_shared_base_computation_equals_running_each_expert_ffn(tiny_model):
    model = tiny_model("moecl")
    model.add_task("a", ["x", "y"])
    _randomise_adapters(model)
    ffn = model.ffn_modules()[1]
    x = torch.randn(2, 7, ffn.base.gate_proj.in_features)
    model.route(["a", "a"])
    weights = ffn.mix_weights(x)
    expected = weights[..., :1] * _naive_expert_ffn(ffn, SHARED, x) + weights[..., 1:] * _naive_expert_ffn(ffn, "a", x)
    assert torch.allclose(ffn(x), expected, atol=1e-5)


def test_mixed_task_batch_routes_each_row_to_its_own_expert(tiny_model):
    model = tiny_model("moecl")
    for task in ("a", "b"):
        model.add_task(task, ["x", "y"])
    _randomise_adapters(model)
    ffn = model.ffn_modules()[0]
    x = torch.randn(4, 6, ffn.base.gate_proj.in_features)
    model.route(["a", "b", "b", "a"])
    mixed = ffn(x)
    model.route(["a"] * 4)
    only_a = ffn(x)
    model.route(["b"] * 4)
    only_b = ffn(x)
    assert torch.allclose(mixed[[0, 3]], only_a[[0, 3]], atol=1e-6)
    assert torch.allclose(mixed[[1, 2]], only_b[[1, 2]], atol=1e-6)
    assert not torch.allclose(only_a, only_b)


def _disc_gradients(model, ids, mask, weight: float) -> tuple[dict, dict, float]:
    model.zero_grad(set_to_none=True)
    model.route(["a", "a", "b", "b"], pool_mask=mask, adversarial_weight=weight)
    model.hidden_states(ids, mask)
    loss, _ = model.discriminator_loss()
    loss.backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters() if ".experts.shared." in n and p.grad is not None}
    disc = {n: p.grad.clone() for n, p in model.named_parameters() if ".discriminator." in n}
    return shared, disc, loss.item()


def test_gradient_reversal_flips_only_the_shared_expert_gradient(tiny_model):
    model = tiny_model("moecl")
    for task in ("a", "b"):
        model.add_task(task, ["x", "y"])
    _randomise_adapters(model)
    model.prepare_training(["b"])
    ids = torch.randint(5, 200, (4, 9))
    mask = torch.ones_like(ids)
    reversed_shared, reversed_disc, _ = _disc_gradients(model, ids, mask, weight=1.0)
    plain_shared, plain_disc, _ = _disc_gradients(model, ids, mask, weight=-1.0)  # -(-1) = identity
    assert reversed_shared and reversed_disc
    for name in plain_shared:
        assert plain_shared[name].abs().sum() > 0
        assert torch.allclose(reversed_shared[name], -plain_shared[name], atol=1e-7), name
    for name in plain_disc:
        assert torch.allclose(reversed_disc[name], plain_disc[name]), name


def test_discriminator_learns_while_its_gradient_into_the_shared_expert_is_reversed(tiny_model):
    model = tiny_model("moecl")
    for task in ("a", "b"):
        model.add_task(task, ["x", "y"])
    _randomise_adapters(model)  # a random tiny backbone's own FFN outputs are ~1e-4: too faint to classify
    discs = [p for m in model.ffn_modules() for p in m.discriminator.parameters()]
    optimizer = torch.optim.Adam(discs, lr=0.05)
    generator = torch.Generator().manual_seed(1)
    # Task 'a' rows use low token ids and 'b' rows high ones: a discriminator can tell them apart.
    ids = torch.cat([torch.randint(5, 100, (2, 8), generator=generator),
                     torch.randint(3000, 3100, (2, 8), generator=generator)])
    mask = torch.ones_like(ids)
    model.prepare_training(["b"])
    losses = []
    for _ in range(40):
        _, _, loss = _disc_gradients(model, ids, mask, weight=1.0)
        optimizer.step()
        losses.append(loss)
    assert losses[-1] < 0.5 * losses[0]
