"""Activation observers: min/max, percentile and MSE ranges from one streaming pass."""
from __future__ import annotations

import pytest
import torch

from clebench.quant.config import QuantConfig
from clebench.quant.observers import HistogramObserver, MinMaxObserver, MseObserver, PercentileObserver, make_observer


def _batches(x: torch.Tensor, size: int):
    return [x[i:i + size] for i in range(0, len(x), size)]


def test_minmax_over_batches():
    observer = MinMaxObserver()
    for batch in ([0.5, 2.0], [-1.5, 0.0], [1.0]):
        observer.update(torch.tensor(batch))
    assert observer.range() == (-1.5, 2.0)


def test_nothing_observed_is_an_error():
    with pytest.raises(ValueError, match="no values"):
        MinMaxObserver().range()


def test_non_finite_activations_are_an_error():
    with pytest.raises(ValueError, match="NaN or infinite"):
        MinMaxObserver().update(torch.tensor([1.0, float("nan")]))


def test_histogram_growth_merges_bins_exactly():
    # batches of growing range force several width doublings; the result must equal a one-shot count
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(1000, generator=generator) * scale for scale in (0.01, 0.1, 1.0, 30.0)]
    streamed = HistogramObserver(half_bins=64)
    for batch in batches:
        streamed.update(batch)
    signed_bin = torch.floor(torch.cat(batches).double() / streamed.width).long()  # bin i covers [i w, (i + 1) w)
    one_shot = torch.bincount(signed_bin + 64, minlength=128).double()
    assert streamed.counts.sum() == 4000
    assert torch.equal(streamed.counts, one_shot)


def test_histogram_starting_from_zeros():
    observer = HistogramObserver(half_bins=16)
    observer.update(torch.zeros(10))
    observer.update(torch.tensor([5.0, -3.0]))
    assert observer.counts.sum() == 12 and observer.zeros == 10
    assert observer.half_bins * observer.width >= 5.0


@pytest.mark.parametrize("percentile", [99.0, 99.9])
def test_percentile_matches_torch_quantile(percentile):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=generator).exp()  # heavy right tail, all positive
    observer = PercentileObserver(percentile)
    for batch in _batches(x, 10_000):
        observer.update(batch)
    low, high = observer.range()
    expected_high = torch.quantile(x[:100_000], percentile / 100).item()  # torch.quantile has an input size limit
    expected_low = torch.quantile(x[:100_000], 1 - percentile / 100).item()
    assert high == pytest.approx(expected_high, rel=0.02)
    assert low == pytest.approx(expected_low, rel=0.05)
    assert high < x.max().item() / 2


def test_percentile_100_is_the_exact_range():
    observer = PercentileObserver(100.0)
    observer.update(torch.tensor([-2.0, 0.0, 1.0, 7.5]))
    assert observer.range() == (-2.0, 7.5)


def test_mse_keeps_a_uniform_range():
    uniform = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 4
    observer = MseObserver(bits=4)
    observer.update(uniform)
    low, high = observer.range()
    assert low == 0.0 and high > 0.9 * uniform.max().item()


def test_mse_clips_a_gaussian_tail_where_theory_says():
    # |N(0, 1)| on 16 levels is N(0, 1) on 32 symmetric levels, whose MSE-optimal clip is about 2.9 sigma
    # (Banner et al., ACIQ, 2019); the observed max of 200k samples is about 4.6
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3)).abs()
    observer = MseObserver(bits=4)
    for batch in _batches(x, 50_000):
        observer.update(batch)
    low, high = observer.range()
    assert low == 0.0 and 2.5 < high < 3.4


def test_mse_ignores_exact_zeros_cost():
    # a ReLU output: half exact zeros, half uniform on [0, 1]; zeros are on every grid, so the full range stays best
    x = torch.cat([torch.zeros(50_000), torch.linspace(0, 1, 50_000)])
    observer = MseObserver(bits=8)
    observer.update(x)
    assert observer.range()[1] > 0.95


def test_make_observer_follows_the_config():
    assert type(make_observer(QuantConfig())) is MinMaxObserver
    assert make_observer(QuantConfig(calibration="percentile", percentile=99.5)).percentile == 99.5
    assert make_observer(QuantConfig(act_bits=6, calibration="mse")).bits == 6
