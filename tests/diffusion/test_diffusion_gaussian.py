import math

import numpy as np
import torch
from guided_diffusion import losses as ref_losses

from diffusion_pl.diffusion import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)


def test_normal_kl_zero_for_equal_and_matches_torch_distributions():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m1, lv1, m1, lv1), torch.zeros(50, dtype=torch.float64))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), ref_losses.normal_kl(m1, lv1, 0.0, 0.0))


def test_approx_cdf_is_the_reference_tanh_form_and_close_to_erf():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(approx_standard_normal_cdf(x), ref_losses.approx_standard_normal_cdf(x))
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 3e-4


def test_discretized_likelihood_sums_to_one_over_256_bins():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    for mean, log_scale in [(0.0, -1.0), (0.3, -3.0), (-0.9, 0.5), (1.0, -5.0)]:
        means = torch.full_like(bins, mean)
        log_scales = torch.full_like(bins, log_scale)
        logp = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales)
        assert abs(logp.exp().sum().item() - 1.0) < 1e-9


def test_discretized_likelihood_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 5, 5), generator=g).float() / 127.5 - 1
    means = torch.randn(4, 3, 5, 5, generator=g) * 0.5
    log_scales = torch.randn(4, 3, 5, 5, generator=g) - 2
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales),
                               ref_losses.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales))


def test_mean_flat():
    x = torch.arange(24.0).view(2, 3, 4)
    np.testing.assert_allclose(mean_flat(x).numpy(), [5.5, 17.5])
