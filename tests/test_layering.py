"""Import rules per layer, checked on the source with ``ast`` (imports at any depth).

Layers: base (``config``, ``errors``) 0, ``numerics`` 1, ``graph`` 2, ``transform`` 3,
``artifacts`` 4, ``integrations`` and ``callbacks`` 5, ``examples`` 6. A module imports only its
own layer or lower; the facade ``dfmpc_fx`` (its ``__init__``) only from layers 5-6.
``numerics`` imports no torch.fx, lightning or mlflow; nothing below the integrations imports
lightning, mlflow, matplotlib or rich.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dfmpc_fx"

LAYERS = {
    "config": 0, "errors": 0, "_version": 0, "numerics": 1, "graph": 2, "transform": 3, "artifacts": 4,
    "integrations": 5, "callbacks": 5, "examples": 6,
}
FACADE = -1  # the dfmpc_fx package itself
HEAVY = ("lightning", "pytorch_lightning", "mlflow", "matplotlib", "rich")
#: (module, subpackage) pairs allowed to break the rules: none. (The CLI's ``zoo:NAME`` spec
#: looks the example zoo up by name with importlib, as it does a user's ``package.module:factory``.)
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()
FORBIDDEN_IN_NUMERICS = ("torch.fx", "lightning", "pytorch_lightning", "mlflow")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> Optional[int]:
    """Layer of a dfmpc_fx module name, FACADE for ``dfmpc_fx`` itself, None outside the package."""
    parts = module.split(".")
    if parts[0] != "dfmpc_fx":
        return None
    if len(parts) == 1:
        return FACADE
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: no layer for dfmpc_fx.{parts[1]} (add it to LAYERS)")
    return LAYERS[parts[1]]


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, at any depth."""
    out: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "dfmpc_fx":
                # `from dfmpc_fx import graph` / `from .. import errors` import a layer's module;
                # `from dfmpc_fx import compress` imports a name of the facade
                for alias in node.names:
                    out.append((node.lineno, f"dfmpc_fx.{alias.name}" if alias.name in LAYERS else "dfmpc_fx"))
            else:
                out.append((node.lineno, target))
                for alias in node.names:  # `from .graph import pairs` imports a submodule
                    out.append((node.lineno, f"{target}.{alias.name}"))
    return out


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    found: list[str] = []
    for line, target in imported_modules(source, module, is_package):
        where = f"{module}:{line} imports {target}"
        if target.split(".")[0] == "dfmpc_fx":
            if module == "dfmpc_fx":
                continue  # the facade re-exports from every layer
            target_layer = layer_of(target)
            if (module, target.split(".")[1] if "." in target else "") in KNOWN_EXCEPTIONS:
                continue
            if target_layer == FACADE:
                if own < 5:
                    found.append(f"{where}: the facade dfmpc_fx is for the integrations and examples only")
            elif target_layer > own:
                found.append(f"{where}: layer {target_layer} above its own layer {own}")
        else:
            if own == 1 and any(target == f or target.startswith(f + ".") for f in FORBIDDEN_IN_NUMERICS):
                found.append(f"{where}: numerics is pure math (no torch.fx, lightning, mlflow)")
            if own is not None and 0 <= own < 5 and target.split(".")[0] in HEAVY:
                found.append(f"{where}: {target.split('.')[0]} only in the integrations and examples")
    return found


def _package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, module_name(path)


def test_every_module_has_a_layer() -> None:
    for _, module in _package_modules():
        layer_of(module)


@pytest.mark.parametrize("path,module", list(_package_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_follow_the_layers(path: Path, module: str) -> None:
    assert violations(path.read_text(), module, path.name == "__init__.py") == []


@pytest.mark.parametrize(
    "module,source,expected",
    [
        ("dfmpc_fx.numerics.quant", "import torch.fx\n", "pure math"),
        ("dfmpc_fx.numerics.quant", "def f():\n    from torch.fx import symbolic_trace\n", "pure math"),
        ("dfmpc_fx.numerics.quant", "from ..graph import pairs\n", "layer 2 above its own layer 1"),
        ("dfmpc_fx.graph.pairs", "from dfmpc_fx.transform.compress import compress\n", "layer 3 above"),
        ("dfmpc_fx.graph.pairs", "import dfmpc_fx\n", "facade"),
        ("dfmpc_fx.transform.compress", "from dfmpc_fx import DFMPCConfig\n", "facade"),
        ("dfmpc_fx.artifacts.export", "if True:\n    import mlflow\n", "mlflow only in"),
        ("dfmpc_fx.graph.bits", "from rich.console import Console\n", "rich only in"),
        ("dfmpc_fx.config", "from .artifacts import export\n", "layer 4 above its own layer 0"),
        ("dfmpc_fx.artifacts.export", "from ..integrations.cli import main\n", "layer 5 above"),
        ("dfmpc_fx.integrations.tracking", "from ..examples import zoo\n", "layer 6 above"),
        ("dfmpc_fx.artifacts.serialization", "from .. import __version__\n", "facade"),
    ],
)
def test_the_checker_catches_violations(module: str, source: str, expected: str) -> None:
    found = violations(source, module)
    assert found and any(expected in v for v in found), found


@pytest.mark.parametrize(
    "module,source",
    [
        ("dfmpc_fx.integrations.cli", "import dfmpc_fx\nimport lightning\nfrom ..transform import compress\n"),
        ("dfmpc_fx.examples.zoo", "from dfmpc_fx import compress\nimport matplotlib\n"),
        ("dfmpc_fx.transform.compress", "from ..graph.pairs import find_compensable_pairs\nfrom ..config import DFMPCConfig\n"),
        ("dfmpc_fx.numerics.quant", "import torch\nfrom ..errors import ConfigError\nfrom .. import config\n"),
        ("dfmpc_fx.graph", "from . import pairs\nfrom .bits import assign_bits\n"),
    ],
)
def test_the_checker_accepts_allowed_imports(module: str, source: str) -> None:
    assert violations(source, module, is_package=module.count(".") == 1) == []
