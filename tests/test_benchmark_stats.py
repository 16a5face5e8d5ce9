"""The exact McNemar test of `benchmarks/paired_significance.py` against hand-computed values."""
from __future__ import annotations

import math

import pytest


@pytest.fixture(scope="module")
def paired(benchmark_module):
    return benchmark_module("paired_significance")


def test_exact_mcnemar_matches_the_binomial_tail(paired) -> None:
    assert paired.exact_mcnemar(0, 0) == 1.0
    assert paired.exact_mcnemar(0, 5) == pytest.approx(2 / 32)  # both one-sided tails of Bin(5, 1/2)
    assert paired.exact_mcnemar(5, 0) == paired.exact_mcnemar(0, 5)
    assert paired.exact_mcnemar(3, 3) == 1.0  # balanced: capped at 1
    # 62 vs 36 (resnet18_fmnist): 2 * P(Bin(98, 1/2) <= 36)
    tail = sum(math.comb(98, i) for i in range(37)) / 2**98
    assert paired.exact_mcnemar(62, 36) == pytest.approx(2 * tail)
    assert 0.005 < paired.exact_mcnemar(62, 36) < 0.02
    assert paired.exact_mcnemar(10, 1) < paired.exact_mcnemar(10, 5) < paired.exact_mcnemar(10, 9)
