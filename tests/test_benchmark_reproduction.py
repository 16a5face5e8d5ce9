"""The committed benchmark numbers are reproduced by a quick subset run.

`benchmarks/accuracy.py` writes `benchmarks/results.json` with each row's accuracy on the full
test set and on the first 1000 test images (the same forward pass). Here a few ResNet-20 rows
are rebuilt from the committed checkpoint with the identical configs (the benchmark's own
`build_rows` / `run_row`) and evaluated on the first 1000 test images: they must match the
committed figures to 0.1 point (one image). Takes well under a minute on one CPU thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results.json"
MODEL = "resnet20"
KEYS = ["fp32", "plain@MP2/6", "paper@MP2/6", "dfmpc@MP2/6", "dfmpc@MP3/6", "w4@all", "bn_ref@MP2/6"]


@pytest.fixture(scope="module")
def committed():
    if not RESULTS.is_file():
        pytest.fail(f"{RESULTS} missing: run `python benchmarks/accuracy.py`")
    data = json.loads(RESULTS.read_text())
    if MODEL not in data["models"]:
        pytest.fail(f"{MODEL} not in {RESULTS}")
    return data


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("accuracy")


def test_results_file_consistent(committed, bench):
    """Every row of the current benchmark definition is in the committed JSON (peer rows may
    be skipped, with a reason), with full-test-set accuracies on 10k images."""
    rows = committed["models"][MODEL]["rows"]
    by_key = {r["key"]: r for r in rows}
    for row in bench.build_rows(peers=False):
        assert row.key in by_key, row.key
        r = by_key[row.key]
        assert r["n_test"] == 10000
        assert 0.0 <= r["acc"] <= 100.0 and 0.0 <= r["acc_first1000"] <= 100.0
        assert r["config"] == row.config
    for r in rows:
        if r["kind"] == "peer" and r.get("skipped"):
            assert r["skipped"].strip()


@pytest.mark.parametrize("key", KEYS)
def test_row_reproduces_on_first_1000(committed, bench, key):
    torch.set_num_threads(committed["meta"]["eval"]["threads"])
    row = {r.key: r for r in bench.build_rows(peers=False)}[key]
    expected = {r["key"]: r for r in committed["models"][MODEL]["rows"]}[key]
    from dfmpc_fx.examples.data import calibration_subset, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    n = committed["meta"]["first_n"]
    got = bench.run_row(row, MODEL, images[:n], labels[:n],
                        calib=lambda: calibration_subset(bench.CALIB_N, seed=0))
    assert abs(got["acc"] - expected["acc_first1000"]) <= 0.1 + 1e-9, (key, got["acc"], expected["acc_first1000"])
    assert abs(got["size_mb"] - expected["size_mb"]) <= 1e-3
