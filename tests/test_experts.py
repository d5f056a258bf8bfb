"""The expert layer: exact mixing, gate normalisation, per-example routing, and the adversarial
term: what the discriminator reads, where its reversed gradient goes, and how its batches weigh."""
from __future__ import annotations

import pytest
import torch

from moecl.experts import SHARED, MoEFeedForward
from moecl.prompts import TaskPrompt


def _randomise_adapters(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.wrapped:
            for name, param in module.named_parameters():
                if not name.startswith("base."):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _two_task_model(tiny_model):
    """A moecl model with tasks 'a' and 'b' and every adapter random (so each one matters)."""
    model = tiny_model("moecl")
    for task in ("a", "b"):
        model.add_task(task, ["x", "y"])
    _randomise_adapters(model)
    return model


def _one_task_ffn(tiny_model, layer: int, method: str = "moecl", **lora):
    """A model with task 'a', every adapter random, routed to 'a' for 2 rows; and one of its FFNs."""
    model = tiny_model(method, **lora)
    model.add_task("a", ["x", "y"])
    _randomise_adapters(model)
    model.route(["a", "a"])
    return model, model.ffn_modules()[layer]


def _naive_expert_ffn(module: MoEFeedForward, expert: str, x: torch.Tensor) -> torch.Tensor:
    """The expert's whole LoRA-adapted FFN, run on its own (the official design)."""
    loras = module.experts[expert]
    base = module.base

    def delta(proj: str, inputs: torch.Tensor):
        return loras[proj](inputs) if proj in loras else 0  # a projection outside lora.targets adds nothing

    hidden = base.act_fn(base.gate_proj(x) + delta("gate_proj", x)) * (base.up_proj(x) + delta("up_proj", x))
    return base.down_proj(hidden) + delta("down_proj", hidden)


def test_gate_weights_are_a_distribution_per_token(tiny_model):
    model = tiny_model("moecl")
    model.add_task("a", ["x", "y"])
    _randomise_adapters(model)
    ffn = model.ffn_modules()[0]
    model.route(["a"] * 3)
    weights = ffn.mix_weights(torch.randn(3, 5, ffn.base.gate_proj.in_features))
    assert weights.shape == (3, 5, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 5), atol=1e-6)
    assert (weights > 0).all() and (weights < 1).all()
    assert weights.std() > 0  # a trained gate gives token-dependent mixes


@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj"], ["down_proj"], ["gate_proj", "up_proj"]])
def test_shared_base_computation_equals_running_each_expert_ffn(tiny_model, targets):
    _, ffn = _one_task_ffn(tiny_model, 1, targets=targets)
    x = torch.randn(2, 7, ffn.base.gate_proj.in_features)
    weights = ffn.mix_weights(x)
    expected = weights[..., :1] * _naive_expert_ffn(ffn, SHARED, x) + weights[..., 1:] * _naive_expert_ffn(ffn, "a", x)
    assert torch.allclose(ffn(x), expected, atol=1e-5)


def test_in_training_both_experts_read_inputs_under_one_dropout_mask_per_position(tiny_model):
    p = 0.3
    _, ffn = _one_task_ffn(tiny_model, 0, dropout=p)
    x = torch.randn(2, 5, ffn.base.gate_proj.in_features)
    ffn.train()
    torch.manual_seed(7)
    out = ffn(x)
    torch.manual_seed(7)  # replay the forward's two masks: the FFN input's, then the hidden state's
    x_in = x * (torch.rand_like(x) >= p) / (1 - p)
    keep = (torch.rand(2, 5, ffn.base.gate_proj.out_features) >= p) / (1 - p)
    expected = 0
    weights = ffn.mix_weights(x)
    for column, expert in enumerate((SHARED, "a")):
        loras = ffn.experts[expert]
        hidden = (ffn.base.act_fn(ffn.base.gate_proj(x) + loras["gate_proj"](x_in))
                  * (ffn.base.up_proj(x) + loras["up_proj"](x_in)))
        expected = expected + weights[..., column:column + 1] * (
            ffn.base.down_proj(hidden) + loras["down_proj"](hidden * keep))
    assert torch.allclose(out, expected, atol=1e-5)


def test_a_one_expert_method_drops_the_ffn_input_and_hidden_state_like_lora_dropout(tiny_model):
    p = 0.3
    _, ffn = _one_task_ffn(tiny_model, 0, "inc-lora", dropout=p)
    x = torch.randn(2, 5, ffn.base.gate_proj.in_features)
    ffn.train()
    torch.manual_seed(7)
    out = ffn(x)
    torch.manual_seed(7)  # replay the forward's two masks
    loras, base = ffn.experts["a"], ffn.base
    x_in = x * (torch.rand_like(x) >= p) / (1 - p)
    hidden = base.act_fn(base.gate_proj(x) + loras["gate_proj"](x_in)) * (base.up_proj(x) + loras["up_proj"](x_in))
    keep = (torch.rand_like(hidden) >= p) / (1 - p)
    assert torch.allclose(out, base.down_proj(hidden) + loras["down_proj"](hidden * keep), atol=1e-5)


def test_the_discriminator_reads_the_shared_experts_addition_to_the_ffn_averaged_over_the_text(tiny_model):
    model = _two_task_model(tiny_model)
    ffn = model.ffn_modules()[1]
    x = torch.randn(2, 6, ffn.base.gate_proj.in_features)
    text = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    model.route(["a", "b"], text_mask=text, adversarial_weight=0.1)
    with torch.no_grad():
        ffn(x)
        added = _naive_expert_ffn(ffn, SHARED, x) - ffn.base(x)
        pooled = (added * text.unsqueeze(-1)).sum(1) / text.sum(1, keepdim=True)
        assert torch.allclose(model.routing.disc_logits[-1], ffn.discriminator(pooled), atol=1e-5)


def _mixed_then_single(model, compute, rows: list[str]) -> list[torch.Tensor]:
    """`compute()` with the batch routed as `rows`, then with every row routed to 'a', then to 'b'."""
    outputs = []
    for routing in (rows, ["a"] * len(rows), ["b"] * len(rows)):
        model.route(routing)
        outputs.append(compute())
    return outputs


@pytest.mark.parametrize("part", ["ffn output", "gate mix"])
def test_each_row_of_a_mixed_batch_uses_its_own_tasks_expert_and_gate(tiny_model, part):
    model = _two_task_model(tiny_model)
    ffn = model.ffn_modules()[0]
    x = torch.randn(4, 6, ffn.base.gate_proj.in_features)
    compute = (lambda: ffn(x)) if part == "ffn output" else (lambda: ffn.mix_weights(x))
    mixed, only_a, only_b = _mixed_then_single(model, compute, ["a", "b", "b", "a"])
    assert torch.allclose(mixed[[0, 3]], only_a[[0, 3]], atol=1e-6)
    assert torch.allclose(mixed[[1, 2]], only_b[[1, 2]], atol=1e-6)
    assert not torch.allclose(only_a, only_b)


def _disc_gradients(model, ids, mask, weight: float) -> tuple[dict, dict, float]:
    """Gradients of the discriminator loss alone. `weight` -1 undoes the reversal (-(-1) = +1)."""
    model.zero_grad(set_to_none=True)
    model.route(["a", "a", "b", "b"], text_mask=mask, adversarial_weight=abs(weight))
    model.routing.adversarial_weight = weight
    model.hidden_states(ids, mask)
    loss, _ = model.discriminator_loss()
    loss.backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters() if ".experts.shared." in n and p.grad is not None}
    disc = {n: p.grad.clone() for n, p in model.named_parameters() if ".discriminator." in n}
    return shared, disc, loss.item()


def test_gradient_reversal_flips_only_the_shared_expert_gradient(tiny_model):
    model = _two_task_model(tiny_model)
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
    model = _two_task_model(tiny_model)  # a random tiny backbone's own FFN outputs are ~1e-4: too faint to classify
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


def test_a_discriminator_only_loss_reaches_no_dedicated_expert_and_no_gate(tiny_model):
    model = _two_task_model(tiny_model)
    model.prepare_training(["b"])
    ids = torch.randint(5, 200, (4, 9))
    _disc_gradients(model, ids, torch.ones_like(ids), weight=1.0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    dedicated = [n for n in grads if ".experts.b." in n or ".gates." in n]
    assert dedicated and all(grads[n] is None or not grads[n].any() for n in dedicated), dedicated
    shared = [n for n in grads if ".experts.shared." in n and n.endswith(".B")]
    assert shared and all(grads[n] is not None and grads[n].any() for n in shared)


def test_the_discriminator_reads_the_text_alone_not_the_instruction_or_task_name(tiny_model):
    model = _two_task_model(tiny_model)
    texts = ["the first text here", "another one, a little longer than that"]
    logits = []
    for instruction in ("Task: a. Say x or y.", "Task: b. Something else entirely, with more words."):
        prompt = TaskPrompt(model.tokenizer, "a", ["x", "y"], 64, instruction)
        encoded = [prompt.encode(t, 0) for t in texts]
        width = max(len(e.ids) for e in encoded)
        ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in encoded])
        mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encoded])
        text = torch.tensor([[1] * e.text_length + [0] * (width - e.text_length) for e in encoded])
        model.route(["a", "b"], text_mask=text, adversarial_weight=0.1)
        with torch.no_grad():
            model.hidden_states(ids, mask)
        logits.append(torch.stack(model.routing.disc_logits))
    assert torch.allclose(logits[0], logits[1], atol=1e-6)


def test_discriminator_loss_weighs_every_task_in_the_batch_equally(tiny_model):
    model = tiny_model("moecl")
    for task in ("old", "new"):
        model.add_task(task, ["x", "y"])
    state = model.routing
    state.disc_labels = torch.tensor([1] * 8 + [0] * 2)  # 8 current rows, 2 from memory
    always_new = torch.tensor([[-5.0, 5.0]]).repeat(10, 1)
    state.disc_logits = [always_new]
    _, accuracy = model.discriminator_loss()
    assert accuracy == pytest.approx(0.5)  # not 0.8: ignoring the input is no better than chance
    uniform = torch.zeros(10, 2, requires_grad=True)
    state.disc_logits = [uniform]
    loss, _ = model.discriminator_loss()
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert torch.allclose(uniform.grad.sum(0), torch.zeros(2), atol=1e-7)  # no pull toward the majority task


def test_without_adversarial_weight_the_discriminator_does_not_run(tiny_model, monkeypatch):
    model = tiny_model("moecl-nogan")
    for task in ("a", "b"):
        model.add_task(task, ["x", "y"])
    monkeypatch.setattr(MoEFeedForward, "_discriminate", lambda *a: pytest.fail("discriminator ran"))
    ids = torch.randint(5, 200, (2, 6))
    model.route(["a", "b"], text_mask=torch.ones_like(ids), adversarial_weight=0.0)
    model.hidden_states(ids, torch.ones_like(ids))
    assert model.routing.disc_labels is None


def test_each_layers_shared_expert_feels_lambda_times_its_own_layers_discriminator_loss(tiny_model):
    """λ is per layer: summed over layers, not averaged (a mean would give each layer λ / layers)."""
    import torch.nn.functional as F

    from moecl.model import balanced_weights

    model = _two_task_model(tiny_model)
    model.prepare_training(["b"])
    ids, lam = torch.randint(5, 200, (4, 9)), 0.3
    mask = torch.ones_like(ids)
    _disc_gradients(model, ids, mask, weight=lam)
    modules = model.ffn_modules()
    assert len(modules) >= 2
    reversed_ = [{n: p.grad.clone() for n, p in m.experts[SHARED].named_parameters()} for m in modules]
    for layer, module in enumerate(modules):
        model.zero_grad(set_to_none=True)
        model.route(["a", "a", "b", "b"], text_mask=mask, adversarial_weight=1.0)
        model.routing.adversarial_weight = -1.0  # the reversal undone: the plain gradient of this layer's loss
        model.hidden_states(ids, mask)
        labels = model.routing.disc_labels
        alone = (F.cross_entropy(model.routing.disc_logits[layer], labels, reduction="none") * balanced_weights(labels)).sum()
        alone.backward()
        for name, param in module.experts[SHARED].named_parameters():
            if name.split(".")[-1] in ("A", "B") and name.startswith(("gate_proj", "up_proj", "down_proj")):
                assert param.grad.abs().sum() > 0, name
                expected = -lam * param.grad  # float sums in another order: tolerance well below a 1/layers factor
                torch.testing.assert_close(reversed_[layer][name], expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())
