"""The ``dfmpc`` command: help, success paths, and each bad-input path.

The main commands run as real subprocesses (``python -m dfmpc_fx.integrations.cli``), once per module and
two at a time, in a scratch folder holding a small model module (``clinets.py``); the rarer
bad-input paths call the same ``main(argv)`` in this process to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

EXIT_OK, EXIT_USAGE, EXIT_FILE, EXIT_MODEL = 0, 2, 3, 4

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Small(nn.Module):
        def __init__(self, classes=5):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(16)
            self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
            self.bn3 = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            x = F.relu(self.bn3(self.conv3(x)))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    class Branchy(Small):
        def forward(self, x):
            if x.mean() > 0:
                return super().forward(x)
            return super().forward(x * 2)

    def make(classes=5):
        torch.manual_seed(0)
        return Small(classes)

    def untraceable():
        return Branchy()

    def not_a_model():
        return 42
    """
)


@dataclass
class Result:
    args: list[str]
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> Result:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="160", PYTHONWARNINGS="ignore")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "dfmpc_fx.integrations.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return Result(args, proc.returncode, proc.stdout, proc.stderr)


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run as real subprocesses (each pays the torch import, so the list is kept short) ...
CASES: dict[str, list[str]] = {
    "help": ["--help"],
    "pairs_resnet18": ["pairs", "torchvision:resnet18"],
    "compress_resnet18": ["compress", "torchvision:resnet18", "--low-bits", "2", "--high-bits", "6", "--out", "resnet18.ts"],
    "compress_small": [
        "compress", "clinets:make", "--weights", "small.pt", "--input-shape", "1,3,16,16", "--low-bits", "3",
        "--high-bits", "7", "--out", "out/small.ts", "--report", "out/small.json", "--markdown", "out/small.md",
        "--plot", "out/small.png", "--mlflow-uri", "sqlite:///cli.db", "--experiment", "cli-test",
    ],
    "missing_weights": ["compress", "clinets:make", "--weights", "nope.pt", "--out", "x.ts"],
    "bad_low_bits": ["compress", "clinets:make", "--low-bits", "5", "--out", "x.ts"],
    "untraceable": ["compress", "clinets:untraceable", "--out", "x.ts"],
    "bad_spec": ["pairs", "resnet18"],
}

# ... and the same entry point, main(argv), in this process for the other bad-input paths.
IN_PROCESS_CASES: dict[str, list[str]] = {
    "mlflow_down": [
        "compress", "clinets:make", "--input-shape", "1,3,16,16", "--out", "down.ts",
        "--mlflow-uri", f"http://127.0.0.1:{_dead_port()}", "--local-dir", "fallback",
    ],
    "help_compress": ["compress", "--help"],
    "no_command": [],
    "pairs_json": ["pairs", "clinets:make", "--json"],
    "pairs_zoo": ["pairs", "zoo:resnet20"],
    "zoo_unknown": ["pairs", "zoo:resnet21"],
    "wrong_weights": ["compress", "clinets:make", "--weights", "other.pt", "--out", "x.ts"],
    "corrupt_weights": ["compress", "clinets:make", "--weights", "corrupt.pt", "--out", "x.ts"],
    "bad_high_bits": ["compress", "clinets:make", "--high-bits", "9", "--out", "x.ts"],
    "non_numeric_bits": ["compress", "clinets:make", "--low-bits", "two", "--out", "x.ts"],
    "missing_out": ["compress", "clinets:make"],
    "out_folder_missing": ["compress", "clinets:make", "--out", "no/such/folder/x.ts"],
    "untraceable_pairs": ["pairs", "clinets:untraceable"],
    "unknown_torchvision": ["pairs", "torchvision:resnet19000"],
    "missing_module": ["pairs", "no_such_module:make"],
    "not_a_model": ["pairs", "clinets:not_a_model"],
    "file_store_uri": ["compress", "clinets:make", "--out", "x.ts", "--mlflow-uri", "./mlruns"],
}


def run_in_process(args: list[str], cwd: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Result:
    from dfmpc_fx.integrations import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("COLUMNS", "160")
    capsys.readouterr()
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return Result(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "clinets.py").write_text(MODELS)
    (root / "out").mkdir()
    sys.path.insert(0, str(root))
    try:
        import clinets
    finally:
        sys.path.remove(str(root))
    torch.save(clinets.make().state_dict(), root / "small.pt")
    torch.save(clinets.make(classes=3).state_dict(), root / "other.pt")
    (root / "corrupt.pt").write_text("this is not a checkpoint")
    return root


@pytest.fixture(scope="module")
def results(workdir: Path) -> dict[str, Result]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, args, workdir) for name, args in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


def test_help_is_readable(results: dict[str, Result]) -> None:
    r = results["help"]
    assert r.code == EXIT_OK, r.text
    for phrase in ("torchvision:<name>", "package.module:factory", "dfmpc pairs torchvision:resnet18",
                   "--low-bits 2 --high-bits 6", "exit codes", "pairs", "compress"):
        assert phrase in r.out, phrase

def test_help_of_compress_and_no_command(workdir: Path, capsys, monkeypatch) -> None:
    c = run_in_process(IN_PROCESS_CASES["help_compress"], workdir, capsys, monkeypatch)
    assert c.code == EXIT_OK
    for opt in ("--out", "--low-bits", "--high-bits", "--weights", "--report", "--mlflow-uri", "--input-shape"):
        assert opt in c.out, opt
    n = run_in_process(IN_PROCESS_CASES["no_command"], workdir, capsys, monkeypatch)
    assert n.code == EXIT_USAGE and "usage: dfmpc" in n.out


def test_pairs_of_torchvision_resnet18(results: dict[str, Result]) -> None:
    r = results["pairs_resnet18"]
    assert r.code == EXIT_OK, r.text
    assert "layer1.0.conv1" in r.out and "layer1.0.conv2" in r.out
    assert "8 pairs over 21 weighted layers" in r.out and "residual/branch" in r.out


def test_pairs_as_json(workdir: Path, capsys, monkeypatch) -> None:
    r = run_in_process(IN_PROCESS_CASES["pairs_json"], workdir, capsys, monkeypatch)
    assert r.code == EXIT_OK, r.text
    data = json.loads(r.out)
    assert data["model"] == "clinets:make"
    assert ("conv2", "conv3") in [(p["first"], p["second"]) for p in data["pairs"]]
    assert all("reason" in x for x in data["refusals"])


def test_pairs_of_a_zoo_model(workdir: Path, capsys, monkeypatch) -> None:
    r = run_in_process(IN_PROCESS_CASES["pairs_zoo"], workdir, capsys, monkeypatch)
    assert r.code == EXIT_OK, r.text
    assert "layer1.0.conv1" in r.out and "pairs over" in r.out


def test_compress_torchvision_resnet18(results: dict[str, Result], workdir: Path) -> None:
    r = results["compress_resnet18"]
    assert r.code == EXIT_OK, r.text
    assert "compression ratio" in r.out and "layer4.1.conv2" in r.out
    scripted = torch.jit.load(str(workdir / "resnet18.ts"))
    with torch.no_grad():
        assert scripted(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_compress_with_weights_report_and_sqlite_mlflow(results: dict[str, Result], workdir: Path) -> None:
    r = results["compress_small"]
    assert r.code == EXIT_OK, r.text
    report = json.loads((workdir / "out/small.json").read_text())
    assert report["config"]["low_bits"] == 3 and report["config"]["high_bits"] == 7 and report["num_pairs"] >= 1
    assert (workdir / "out/small.md").read_text().strip()
    assert (workdir / "out/small.png").read_bytes()[:4] == b"\x89PNG"
    # the file is the compressed version of the given weights
    sys.path.insert(0, str(workdir))
    try:
        import clinets
    finally:
        sys.path.remove(str(workdir))
    import dfmpc_fx

    model = clinets.Small()
    model.load_state_dict(torch.load(workdir / "small.pt"))
    qmodel = dfmpc_fx.compress(model.eval(), dfmpc_fx.DFMPCConfig(low_bits=3, high_bits=7))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(workdir / "out/small.ts"))(x), qmodel(x))
    # logged to the sqlite store
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'cli.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["dfmpc.low_bits"] == "3"
    assert runs[0].data.params["dfmpc.model"] == "clinets:make"
    assert "compression_ratio" in runs[0].data.metrics
    assert "MLflow run" in r.out


def test_unreachable_mlflow_keeps_results_locally(workdir: Path, capsys, monkeypatch) -> None:
    with pytest.warns(RuntimeWarning, match="results saved to"):
        r = run_in_process(IN_PROCESS_CASES["mlflow_down"], workdir, capsys, monkeypatch)
    assert r.code == EXIT_OK, r.text
    assert (workdir / "down.ts").is_file()
    folders = list((workdir / "fallback").iterdir())
    assert len(folders) == 1 and (folders[0] / "TRACKING_FAILED.txt").is_file()
    assert (folders[0] / "model.ts").is_file() and (folders[0] / "report.json").is_file()
    assert "results saved to" in r.err


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing_weights", EXIT_FILE, "weights file not found: nope.pt"),
        ("bad_low_bits", EXIT_USAGE, "low_bits=5 is out of range"),
        ("untraceable", EXIT_MODEL, "--leaf-module"),
        ("bad_spec", EXIT_USAGE, "is not a model spec"),
    ],
)
def test_bad_input_in_a_subprocess(results: dict[str, Result], case: str, code: int, message: str) -> None:
    r = results[case]
    assert r.code == code, r.text
    assert message in " ".join(r.err.split()), r.err
    assert "Traceback" not in r.err


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("wrong_weights", EXIT_FILE, "does not fit the model"),
        ("corrupt_weights", EXIT_FILE, "cannot read weights from corrupt.pt"),
        ("bad_high_bits", EXIT_USAGE, "high_bits=9 is out of range"),
        ("non_numeric_bits", EXIT_USAGE, "expected a whole number of bits, got 'two'"),
        ("missing_out", EXIT_USAGE, "the following arguments are required: --out"),
        ("out_folder_missing", EXIT_FILE, "folder no/such/folder does not exist"),
        ("untraceable_pairs", EXIT_MODEL, "TraceError"),
        ("unknown_torchvision", EXIT_USAGE, "torchvision has no model 'resnet19000'"),
        ("missing_module", EXIT_USAGE, "cannot import 'no_such_module'"),
        ("not_a_model", EXIT_USAGE, "returned int, not a torch.nn.Module"),
        ("file_store_uri", EXIT_USAGE, "MLflow 3 refuses"),
        ("zoo_unknown", EXIT_USAGE, "dfmpc_fx.examples.zoo has no model 'resnet21'"),
    ],
)
def test_bad_input_in_process(workdir: Path, capsys, monkeypatch, case: str, code: int, message: str) -> None:
    r = run_in_process(IN_PROCESS_CASES[case], workdir, capsys, monkeypatch)
    assert r.code == code, r.text
    assert message in " ".join(r.err.split()), r.err
    assert "Traceback" not in r.err


def test_installed_console_script() -> None:
    exe = shutil.which("dfmpc") or str(Path(sys.executable).with_name("dfmpc"))
    if not Path(exe).exists():
        pytest.skip("the dfmpc console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: dfmpc" in proc.stdout


@pytest.mark.parametrize("out,fmt", [("out/m.pt2", None), ("out/m.onnx", None), ("out/m.bin", "program")])
def test_compress_exports_program_and_onnx_packed(workdir: Path, capsys, monkeypatch, out: str, fmt) -> None:
    """--format (or the --out suffix) picks torch.export or ONNX; --packed stores bit-packed codes.
    The file reloads with its own runtime and matches the compressed model."""
    if out.endswith(".onnx"):
        pytest.importorskip("onnxruntime")
    args = ["compress", "clinets:make", "--input-shape", "1,3,16,16", "--out", out, "--packed"]
    if fmt:
        args += ["--format", fmt]
    res = run_in_process(args, workdir, capsys, monkeypatch)
    assert res.code == 0, res.text
    kind = fmt or ("program" if out.endswith(".pt2") else "onnx")
    assert f"{kind} file (packed)" in res.out and "reloaded vs in-memory" in res.out
    path = workdir / out
    x = torch.randn(2, 3, 16, 16)
    if kind == "program":
        got = torch.export.load(str(path)).module()(x[:1])
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0])
    assert got.shape[0] == 1 and torch.isfinite(got).all()


def test_compress_rejects_unknown_format(workdir: Path, capsys, monkeypatch) -> None:
    res = run_in_process(["compress", "clinets:make", "--out", "x.ts", "--format", "tflite"], workdir, capsys, monkeypatch)
    assert res.code != 0 and "tflite" in res.err


def test_compress_with_target_bits(tmp_path):
    """`dfmpc compress --target-bits`: the budget reaches the config, the report and the file."""
    from dfmpc_fx.integrations.cli import main

    out = tmp_path / "m.ts"
    report = tmp_path / "r.json"
    rc = main(["compress", "zoo:resnet20", "--target-bits", "3.0", "--out", str(out), "--report", str(report)])
    assert rc == 0 and out.is_file()
    import json

    data = json.loads(report.read_text())
    assert data["config"]["target_bits"] == 3.0
    assert data["bits_per_weight"] <= 3.0
    assert {layer["role"] for layer in data["layers"]} == {"budget"}
    rc = main(["compress", "zoo:resnet20", "--target-bits", "3.0", "--low-bits", "3", "--out", str(out)])
    assert rc != 0
    # a layout flag equal to its default is still a flag the budget would ignore
    rc = main(["compress", "zoo:resnet20", "--target-bits", "3.0", "--first-last-bits", "8", "--out", str(out)])
    assert rc != 0


def test_compress_packs_by_default_and_float_weights_opt_out(workdir: Path, capsys, monkeypatch) -> None:
    """Without flags the TorchScript file is the packed artifact; --float-weights (alias
    --no-packed) exports the fake-quant float weights, a larger file."""
    base = ["compress", "clinets:make", "--input-shape", "1,3,16,16"]
    res = run_in_process(base + ["--out", "out/default.ts"], workdir, capsys, monkeypatch)
    assert res.code == 0, res.text
    assert "torchscript file (packed)" in res.out
    sizes = {}
    for flag in ("--float-weights", "--no-packed"):
        out = f"out/float{flag}.ts"
        res = run_in_process(base + ["--out", out, flag], workdir, capsys, monkeypatch)
        assert res.code == 0, res.text
        assert "(packed)" not in res.out
        sizes[flag] = (workdir / out).stat().st_size
    assert min(sizes.values()) > (workdir / "out/default.ts").stat().st_size


def test_compress_fold_and_factor_flags(tmp_path):
    """`--target-bytes` folds the BatchNorms by default (the report says which), `--fold-batchnorm
    off` keeps them, and the three auto/on/off flags reach the config."""
    import json

    from dfmpc_fx.integrations.cli import main

    out, report = tmp_path / "m.ts", tmp_path / "r.json"
    args = ["compress", "zoo:resnet20", "--target-bytes", "120000", "--out", str(out), "--report", str(report)]
    assert main(args) == 0
    folded = json.loads(report.read_text())
    assert folded["compressed_bytes"] <= 120000 and any(l["batchnorm_folded"] for l in folded["layers"])
    assert main(args + ["--fold-batchnorm", "off", "--fold-scales", "off", "--input-scales", "on"]) == 0
    kept = json.loads(report.read_text())
    assert not any(l["batchnorm_folded"] for l in kept["layers"]) and not any(l["scales_folded"] for l in kept["layers"])
    assert (kept["config"]["fold_batchnorm"], kept["config"]["fold_scales"], kept["config"]["input_scales"]) == (False, False, True)
    assert kept["bits_per_weight"] < folded["bits_per_weight"]  # the BatchNorms' bytes buy bits
    with pytest.raises(SystemExit) as info:  # argparse: a usage error naming the choices
        main(args + ["--fold-batchnorm", "maybe"])
    assert info.value.code == 2
