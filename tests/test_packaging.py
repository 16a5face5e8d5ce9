"""The wheel: it builds, and installing it with the lightning and mlflow extras into the test
environment changes nothing but dfmpc-fx itself (torch, lightning, mlflow stay as they are).
``import dfmpc_fx`` and ``compress`` work where lightning and mlflow cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # a copy of what the wheel is built from: setuptools writes build/ and *.egg-info in-tree
    import shutil

    src = build / "src"
    shutil.copytree(REPO / "dfmpc_fx", src / "dfmpc_fx", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = _env()
    env["TMPDIR"] = str(build)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    wheels = list(out.glob("dfmpc_fx-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_holds_every_layer(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for sub in ("numerics", "graph", "transform", "artifacts", "integrations", "callbacks", "examples"):
        assert f"dfmpc_fx/{sub}/__init__.py" in names, sub
    assert not any(n.startswith(("tests/", "integration/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dfmpc = dfmpc_fx.integrations.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installing_with_extras_changes_only_dfmpc_fx(wheel: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-q", "--report", str(report),
         f"{wheel}[lightning,mlflow]"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    # --no-index: a dependency the venv lacks (or has at a version outside the range) fails here
    assert res.returncode == 0, res.stdout + res.stderr
    planned = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert set(planned) <= {"dfmpc-fx"}, f"the install would change {planned}"


@pytest.mark.slow
def test_compress_works_without_lightning_and_mlflow(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        BLOCKED = ("lightning", "pytorch_lightning", "lightning_fabric", "mlflow")

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, _Block())
    """))
    code = textwrap.dedent("""
        import sys
        import torch
        from torch import nn
        try:
            import lightning
        except ImportError:
            pass
        else:
            raise SystemExit("the import hook did not block lightning")
        import dfmpc_fx
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        net = nn.Sequential(*block(3, 8), *block(8, 8), *block(8, 8), *block(8, 8),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
        q = dfmpc_fx.compress(net, low_bits=2, high_bits=6)
        assert dfmpc_fx.get_report(q).num_pairs >= 1
        x = torch.randn(2, 3, 8, 8)
        assert q(x).shape == (2, 4)
        loaded = [m for m in sys.modules if m.split(".")[0] in ("lightning", "mlflow", "matplotlib")]
        assert not loaded, loaded
        print("ok")
    """)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(REPO)])
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
