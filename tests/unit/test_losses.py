"""The load-balancing loss: real gradient, responds to skew, ignores padding."""

from __future__ import annotations

import torch

from moce_plugin.model.losses import grouped_load_balancing_loss


def _probs(logits):
    return torch.softmax(logits, -1)


def test_uniform_routing_gives_one_and_skew_gives_more():
    T, E = 64, 4
    groups = torch.zeros(T, dtype=torch.long)
    valid = torch.ones(T, dtype=torch.bool)
    uniform = torch.full((T, E), 1.0 / E)
    chosen = torch.arange(T).remainder(E)[:, None]
    loss, load, _ = grouped_load_balancing_loss(uniform, chosen, groups, valid, 1)
    assert torch.isclose(loss, torch.tensor(1.0))
    assert torch.allclose(load, torch.full((1, E), 0.25))
    skewed = _probs(torch.tensor([4.0, 0, 0, 0]).expand(T, E))
    loss_skew, load_skew, _ = grouped_load_balancing_loss(
        skewed, skewed.topk(1).indices, groups, valid, 1)
    assert loss_skew > 2.5 and load_skew[0, 0] == 1.0


def test_gradient_pushes_away_from_the_overloaded_expert():
    T, E = 32, 4
    logits = torch.zeros(T, E)
    logits[:, 0] = 2.0
    logits.requires_grad_(True)
    probs = _probs(logits)
    loss, _, _ = grouped_load_balancing_loss(
        probs, probs.topk(2).indices, torch.zeros(T, dtype=torch.long),
        torch.ones(T, dtype=torch.bool), 1)
    loss.backward()
    # Gradient descent lowers the overloaded expert's logit.
    assert (logits.grad[:, 0] > 0).all()
    assert logits.grad.abs().sum() > 0


def test_padding_never_counts():
    gen = torch.Generator().manual_seed(0)
    T, E, C = 40, 4, 3
    logits = torch.randn(T, E, generator=gen)
    groups = torch.randint(0, C, (T,), generator=gen)
    valid = torch.rand(T, generator=gen) > 0.3
    probs = _probs(logits)
    chosen = probs.topk(2).indices
    ref, ref_load, ref_tokens = grouped_load_balancing_loss(probs, chosen, groups, valid, C)
    # Change everything at padded positions: logits, groups, chosen experts.
    logits2 = logits.clone()
    logits2[~valid] = torch.randn(int((~valid).sum()), E, generator=gen) * 10
    groups2 = groups.clone()
    groups2[~valid] = 0
    probs2 = _probs(logits2)
    chosen2 = probs2.topk(2).indices
    got, got_load, got_tokens = grouped_load_balancing_loss(probs2, chosen2, groups2, valid, C)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_load, ref_load)
    torch.testing.assert_close(got_tokens, ref_tokens)
    # Appending padded rows changes nothing either.
    pad = torch.zeros(7, dtype=torch.bool)
    more, _, _ = grouped_load_balancing_loss(
        torch.cat([probs, _probs(torch.randn(7, E))]),
        torch.cat([chosen, torch.zeros(7, 2, dtype=torch.long)]),
        torch.cat([groups, torch.ones(7, dtype=torch.long)]), torch.cat([valid, pad]), C)
    torch.testing.assert_close(more, ref)


def test_groups_are_balanced_separately():
    # Group 0 sends everything to expert 0, group 1 to expert 1: each group is skewed
    # although the experts' total use would look balanced to a single global router.
    probs = torch.tensor([[0.9, 0.1]] * 10 + [[0.1, 0.9]] * 10)
    groups = torch.tensor([0] * 10 + [1] * 10)
    loss, load, tokens = grouped_load_balancing_loss(
        probs, probs.topk(1).indices, groups, torch.ones(20, dtype=torch.bool), 2)
    assert loss > 1.5
    assert load.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert tokens.tolist() == [10.0, 10.0]


def test_soft_merging_uses_probabilities_as_dispatch():
    probs = _probs(torch.tensor([[3.0, 0.0], [3.0, 0.0]]))
    loss, load, _ = grouped_load_balancing_loss(
        probs, None, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool), 1)
    assert torch.allclose(load[0], probs[0])
    assert loss > 1.0
