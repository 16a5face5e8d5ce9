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


def test_fidelity_counts_agreement_and_relative_logit_error(benchmark_module) -> None:
    import torch

    fidelity = benchmark_module("accuracy").fidelity
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert fidelity(ref.clone(), ref) == (100.0, 0.0)
    # one of four predictions flips; the error is the squared change over the centred reference
    moved = ref.clone()
    moved[2] = torch.tensor([0.0, 1.5, 1.0])
    agree, err = fidelity(moved, ref)
    assert agree == 75.0
    centred = ref - ref.mean(dim=0)
    assert err == pytest.approx(1.5 ** 2 / float((centred ** 2).sum()))
    # a constant shift of every logit changes no prediction but counts as error
    agree, err = fidelity(ref + 1.0, ref)
    assert agree == 100.0 and err == pytest.approx(12.0 / float((centred ** 2).sum()))


def test_rewriting_the_accuracy_tables_keeps_the_other_sections(benchmark_module, tmp_path) -> None:
    acc = benchmark_module("accuracy")
    path = tmp_path / "BENCHMARKS.md"
    budget = "<!-- budget:begin -->\nbudget tables\n<!-- budget:end -->"
    tail = "\n\n## MTCNN\nhand-written from mtcnn.py\n"
    path.write_text(budget + "\n\nold accuracy tables\n" + acc.GENERATED_END + tail)
    acc._write_markdown(path, "new accuracy tables\n" + acc.GENERATED_END + "\n")
    text = path.read_text()
    assert text.startswith(budget + "\n\nnew accuracy tables\n")
    assert "old accuracy tables" not in text
    assert text.endswith("new accuracy tables\n" + acc.GENERATED_END + tail)
    # a file without the marker keeps nothing after the generated part (as before)
    path.write_text(budget + "\n\nold accuracy tables\n")
    acc._write_markdown(path, "new\n")
    assert path.read_text() == budget + "\n\nnew\n"
