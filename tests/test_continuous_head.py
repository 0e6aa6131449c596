"""The tanh-squashed Gaussian policy head: densities, bounds, gradients, entropy."""

from __future__ import annotations

import math

import pytest
import torch

from mow.models.continuous import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    TanhGaussian,
    TanhGaussianHead,
    tanh_log_det_jacobian,
)


def test_log_prob_matches_a_hand_computed_value():
    # One action dimension: mean 0.3, std 0.5, action 0.6.
    # u = atanh(0.6) = 0.5 * ln(1.6 / 0.4) = 0.5 * ln 4 = ln 2
    # log N(u; 0.3, 0.5) = -0.5 * ((ln 2 - 0.3) / 0.5)^2 - ln 0.5 - 0.5 * ln(2 pi)
    # log |d tanh / du| = ln(1 - 0.6^2) = ln 0.64
    u = math.log(2.0)
    expected = -0.5 * ((u - 0.3) / 0.5) ** 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    expected -= math.log(0.64)
    dist = TanhGaussian(torch.tensor([0.3], dtype=torch.float64),
                        torch.tensor([math.log(0.5)], dtype=torch.float64))
    assert dist.log_prob(torch.tensor([0.6], dtype=torch.float64)).item() == pytest.approx(
        expected, abs=1e-12
    )
    # Two independent dimensions sum; the second (mean -1, std 1, action -0.2) by hand too.
    u2 = math.atanh(-0.2)
    expected2 = -0.5 * (u2 + 1.0) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(1 - 0.04)
    dist2 = TanhGaussian(torch.tensor([0.3, -1.0]), torch.tensor([math.log(0.5), 0.0]))
    value = dist2.log_prob(torch.tensor([0.6, -0.2]))
    assert value.shape == () and value.item() == pytest.approx(expected + expected2, rel=1e-5)


def test_jacobian_term_is_stable_where_tanh_saturates():
    u = torch.tensor([-30.0, -5.0, 0.0, 5.0, 30.0])
    naive = torch.log(1 - torch.tanh(u.double()) ** 2)
    stable = tanh_log_det_jacobian(u)
    assert torch.isfinite(stable).all()
    assert torch.allclose(stable[1:4].double(), naive[1:4], atol=1e-5)
    assert stable[0].item() == pytest.approx(2 * (math.log(2) - 30.0), rel=1e-6)
    assert torch.isinf(torch.log(1 - torch.tanh(u[-1:]) ** 2)).all()  # what it avoids


def test_log_prob_of_a_sample_matches_the_exact_density_and_bounds_are_finite():
    torch.manual_seed(0)
    dist = TanhGaussian(torch.randn(64, 4), torch.full((64, 4), -0.5))
    action, exact = dist.sample_with_log_prob()
    assert torch.allclose(dist.log_prob(action), exact, atol=2e-3)
    edge = dist.log_prob(torch.tensor([1.0, -1.0, 1.0, -1.0]).expand(64, 4))
    assert torch.isfinite(edge).all()


def test_density_integrates_to_one():
    dist = TanhGaussian(torch.tensor([0.4], dtype=torch.float64),
                        torch.tensor([math.log(0.7)], dtype=torch.float64))
    grid = torch.linspace(-1 + 1e-9, 1 - 1e-9, 200_001, dtype=torch.float64).unsqueeze(-1)
    density = dist.log_prob(grid).exp()
    assert torch.trapezoid(density, grid.squeeze(-1)).item() == pytest.approx(1.0, abs=1e-4)


def test_actions_stay_in_bounds_over_many_samples():
    torch.manual_seed(1)
    # Wide, off-centre distributions push tanh into saturation.
    mean = torch.tensor([[-20.0, -3.0, 0.0, 3.0, 20.0]]).expand(1000, 5)
    dist = TanhGaussian(mean, torch.full((1000, 5), LOG_STD_MAX))
    actions = dist.sample((20,))
    assert actions.shape == (20, 1000, 5)
    assert actions.min() >= -1.0 and actions.max() <= 1.0
    assert torch.isfinite(dist.log_prob(actions)).all()
    assert dist.mode().abs().max() <= 1.0


def test_gradient_flows_through_rsample_and_entropy():
    torch.manual_seed(2)
    head = TanhGaussianHead(8, 4)
    features = torch.randn(16, 8)
    dist = head(features)
    assert dist.mean.shape == (16, 4)
    assert (dist.log_std >= LOG_STD_MIN).all() and (dist.log_std <= LOG_STD_MAX).all()
    # A reparameterised objective (maximise the first action coordinate).
    dist.sample()[:, 0].mean().backward()
    grad = head.linear.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    head.zero_grad()
    head(features).entropy(samples=4).mean().backward()
    assert head.linear.weight.grad.abs().sum() > 0


def test_log_std_is_clamped_and_entropy_estimate_is_consistent():
    dist = TanhGaussian(torch.zeros(3), torch.tensor([-50.0, 0.0, 50.0]))
    assert dist.log_std.tolist() == [LOG_STD_MIN, 0.0, LOG_STD_MAX]
    torch.manual_seed(3)
    narrow = TanhGaussian(torch.zeros(2), torch.full((2,), -4.0))
    # Near 0 tanh is ~identity: the squashed entropy is ~the Gaussian's.
    assert narrow.entropy(samples=4000).item() == pytest.approx(
        narrow.gaussian_entropy().item(), abs=0.01
    )
    wide = TanhGaussian(torch.zeros(2), torch.full((2,), 1.0))
    # Squashing into [-1, 1] bounds the entropy by the uniform's: 2 * ln 2.
    assert wide.entropy(samples=4000).item() < 2 * math.log(2)
    with pytest.raises(ValueError):
        TanhGaussian(torch.zeros(2), torch.zeros(3))
