"""Hand-computed checks of mow.numerics (symlog, two-hot, KL, λ-return, percentiles)."""

from __future__ import annotations

import math

import pytest
import torch

from mow.numerics import (
    PercentileNormalizer,
    TwoHot,
    categorical_kl,
    kl_loss_free_bits,
    lambda_return,
    symexp,
    symlog,
    unimix_logits,
    update_normalizers,
)


def test_symlog_known_values_and_round_trip():
    x = torch.tensor([-1000.0, -math.e + 1.0, -0.5, 0.0, math.e - 1.0, 3.0, 1e5])
    assert symlog(torch.tensor([math.e - 1.0, 1.0 - math.e, 0.0])).tolist() == pytest.approx(
        [1.0, -1.0, 0.0], abs=1e-6
    )
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-5, atol=1e-6)


def test_two_hot_default_bins():
    two_hot = TwoHot()
    assert two_hot.bins.shape == (255,)
    assert two_hot.bins[0].item() == -20.0 and two_hot.bins[-1].item() == 20.0
    assert two_hot.bins[127].item() == pytest.approx(0.0, abs=1e-6)
    # Bins are derived data: not saved in checkpoints.
    assert "bins" not in two_hot.state_dict()


def test_two_hot_encode_on_a_bin_and_between_bins():
    two_hot = TwoHot(num_bins=5, low=-2.0, high=2.0)  # bins -2, -1, 0, 1, 2 (symlog space)
    targets = torch.tensor(
        [
            symexp(torch.tensor(1.0)).item(),  # exactly on bin 3
            symexp(torch.tensor(0.25)).item(),  # 3/4 on bin 2, 1/4 on bin 3
            symexp(torch.tensor(-1.5)).item(),  # halfway between bins 0 and 1
            symexp(torch.tensor(2.0)).item(),  # on the top edge
            1e6,  # beyond the top: clamped
        ]
    )
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.75, 0.25, 0.0],
            [0.5, 0.5, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    torch.testing.assert_close(two_hot.encode(targets), expected, atol=1e-5, rtol=0)


def test_two_hot_decode_inverts_encode():
    two_hot = TwoHot()
    values = torch.tensor([-1000.0, -3.7, -0.01, 0.0, 0.5, 12.3, 5000.0])
    decoded = two_hot.decode(torch.log(two_hot.encode(values)))
    torch.testing.assert_close(decoded, values, rtol=1e-5, atol=1e-6)


def test_two_hot_cross_entropy_by_hand():
    two_hot = TwoHot(num_bins=5, low=-2.0, high=2.0)
    logits = torch.tensor([[0.0, 0.0, math.log(3.0), 0.0, 0.0]])  # probs 1/7, 1/7, 3/7, 1/7, 1/7
    target = symexp(torch.tensor([0.25]))  # weights 0.75 on bin 2, 0.25 on bin 3
    expected = 0.75 * math.log(7.0 / 3.0) + 0.25 * math.log(7.0)
    assert two_hot.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_unimix_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # probs 0.75, 0.25
    mixed = unimix_logits(logits, mix=0.1).exp()
    torch.testing.assert_close(mixed, torch.tensor([[0.725, 0.275]]))
    assert unimix_logits(logits.bfloat16()).dtype == torch.float32


def test_categorical_kl_by_hand():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])  # one sample, two variables
    q = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    expected = (
        0.5 * math.log(0.5 / 0.25)
        + 0.5 * math.log(0.5 / 0.75)
        + 0.9 * math.log(0.9 / 0.5)
        + 0.1 * math.log(0.1 / 0.5)
    )
    kl = categorical_kl(p.log(), q.log())
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    # Logits are shift-invariant per variable.
    assert categorical_kl(p.log() + 3.0, q.log() - 1.0).item() == pytest.approx(expected, rel=1e-5)


def _kl_pair(kl_target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one two-class variable with KL(p ‖ q) = ``kl_target``.

    p = (1/2, 1/2), q = (s, 1 - s): KL = -log 2 - log(s (1 - s)) / 2, so
    s = (1 - sqrt(1 - exp(-2 KL))) / 2.
    """
    s = (1.0 - math.sqrt(1.0 - math.exp(-2.0 * kl_target))) / 2.0
    p = torch.tensor([[[0.5, 0.5]]]).log()
    q = torch.tensor([[[s, 1.0 - s]]]).log()
    return p, q


def test_free_bits_clip_the_mean_not_each_element():
    small = [_kl_pair(0.2), _kl_pair(0.5)]
    p = torch.cat([pair[0] for pair in small])
    q = torch.cat([pair[1] for pair in small]).requires_grad_(True)
    loss, raw = kl_loss_free_bits(p, q, free_bits=1.0)
    assert loss.item() == 1.0
    assert raw.item() == pytest.approx(0.35, rel=1e-4)
    loss.backward()
    assert torch.count_nonzero(q.grad) == 0

    mixed = [_kl_pair(0.5), _kl_pair(2.0)]  # per-element clipping would give 1.5
    p = torch.cat([pair[0] for pair in mixed])
    q = torch.cat([pair[1] for pair in mixed]).requires_grad_(True)
    loss, raw = kl_loss_free_bits(p, q, free_bits=1.0)
    assert loss.item() == pytest.approx(1.25, rel=1e-4)
    assert raw.item() == pytest.approx(1.25, rel=1e-4)
    loss.backward()
    assert torch.count_nonzero(q.grad) > 0


REWARDS = [[1.0, 2.0, 3.0]]
VALUES = [[10.0, 20.0, 30.0, 40.0]]  # V(s_0) .. V(s_3)


@pytest.mark.parametrize(
    ("continues", "form", "expected"),
    [
        # official: G_t = r_t + γ c_t [(1-λ) V(s_t) + λ G_{t+1}], γ = 0.9, λ = 0.5, G_3 = 40
        # G_2 = 3 + 0.9 (15 + 20) = 34.5; G_1 = 2 (terminal); G_0 = 1 + 0.9 (5 + 1) = 6.4
        ([[1.0, 0.0, 1.0]], "official", [6.4, 2.0, 34.5]),
        # paper: V(s_{t+1}) instead. G_2 = 3 + 0.9 (20 + 20) = 39; G_1 = 2;
        # G_0 = 1 + 0.9 (10 + 1) = 10.9
        ([[1.0, 0.0, 1.0]], "paper", [10.9, 2.0, 39.0]),
        # official, no termination: G_1 = 2 + 0.9 (10 + 17.25) = 26.525;
        # G_0 = 1 + 0.9 (5 + 13.2625) = 17.43625
        ([[1.0, 1.0, 1.0]], "official", [17.43625, 26.525, 34.5]),
    ],
)
def test_lambda_return_by_hand(continues, form, expected):
    returns = lambda_return(
        torch.tensor(REWARDS), torch.tensor(VALUES), torch.tensor(continues), 0.9, 0.5, form
    )
    torch.testing.assert_close(returns, torch.tensor([expected]))


@pytest.mark.parametrize("form", ["official", "paper"])
def test_lambda_return_matches_the_backward_recursion(form):
    generator = torch.Generator().manual_seed(0)
    batch, horizon, gamma, lam = 7, 16, 0.985, 0.95
    rewards = torch.randn(batch, horizon, generator=generator)
    values = torch.randn(batch, horizon + 1, generator=generator) * 10
    continues = (torch.rand(batch, horizon, generator=generator) > 0.2).float()
    expected = torch.empty(batch, horizon)
    following = values[:, -1]
    for t in reversed(range(horizon)):
        bootstrap = values[:, t] if form == "official" else values[:, t + 1]
        following = rewards[:, t] + gamma * continues[:, t] * (
            (1 - lam) * bootstrap + lam * following
        )
        expected[:, t] = following
    returns = lambda_return(rewards, values, continues, gamma, lam, form)
    torch.testing.assert_close(returns, expected, rtol=1e-5, atol=1e-4)


def test_lambda_return_rejects_unknown_form_and_bad_shapes():
    with pytest.raises(ValueError, match="lambda form"):
        lambda_return(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2), 0.9, 0.5, "dreamer")
    with pytest.raises(ValueError, match="T \\+ 1"):
        lambda_return(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 0.9, 0.5)


def test_percentile_normalizer_two_updates_by_hand():
    normalizer = PercentileNormalizer(decay=0.99, low=0.05, high=0.95)
    assert normalizer.scale().item() == 1.0
    # 0..100: 5th percentile 5, 95th 95. EMAs from 0: low 0.05, high 0.95 -> scale floored at 1.
    scale = normalizer.update(torch.arange(101.0).view(1, -1))
    assert normalizer.low.item() == pytest.approx(0.05)
    assert normalizer.high.item() == pytest.approx(0.95)
    assert scale.item() == 1.0
    # 0, 10, .., 1000: percentiles 50 and 950.
    # low = 0.99 * 0.05 + 0.01 * 50 = 0.5495; high = 0.99 * 0.95 + 0.01 * 950 = 10.4405
    scale = normalizer.update(torch.arange(0.0, 1001.0, 10.0))
    assert normalizer.low.item() == pytest.approx(0.5495)
    assert normalizer.high.item() == pytest.approx(10.4405)
    assert scale.item() == pytest.approx(10.4405 - 0.5495)
    state = normalizer.state_dict()
    assert set(state) == {"low", "high"}
    restored = PercentileNormalizer()
    restored.load_state_dict(state)
    assert restored.scale().item() == pytest.approx(scale.item())


def test_update_normalizers_equals_each_normalizer_updated_alone():
    """Ragged rows padded with NaN: the joint update gives every normaliser the EMAs and
    scale its own ``update`` gives on its row's values alone, and mixed settings are refused."""
    torch.manual_seed(0)
    values = [torch.randn(7) * 30, torch.randn(3) * 2, torch.randn(12) * 5 + 40]
    alone = [PercentileNormalizer(decay=0.9) for _ in values]
    joint = [PercentileNormalizer(decay=0.9) for _ in values]
    padded = torch.full((3, 12), float("nan"))
    for i, v in enumerate(values):
        padded[i, : len(v)] = v
    for _ in range(2):  # the second update folds into non-zero EMAs
        expected = torch.stack([n.update(v) for n, v in zip(alone, values)])
        scales = update_normalizers(joint, padded)
        torch.testing.assert_close(scales, expected)
        for a, j in zip(alone, joint):
            torch.testing.assert_close(j.low, a.low)
            torch.testing.assert_close(j.high, a.high)
    assert float(expected[1]) == 1.0 and float(expected[2]) > 1.0  # floored, and a real spread
    with pytest.raises(ValueError, match="one decay"):
        update_normalizers([PercentileNormalizer(decay=0.9), PercentileNormalizer(decay=0.99)], padded[:2])
