"""The public surface: what `orion_fsm.__all__` names exists, every type in a public signature
can be imported from `orion_fsm`, the CLI is a client of the public API only, and importing
`orion_fsm` stays cheap (trio's `_tests/test_exports.py` is the model).
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import orion_fsm
import orion_fsm.http
import orion_fsm.replay
import orion_fsm.testing
from orion_fsm import Engine, ResponseStream, Result

CLI = Path(orion_fsm.__file__).parent / "cli"
HTTP = Path(orion_fsm.__file__).parent / "http"
# What a client layer (the CLI, the HTTP server) may import from orion_fsm, besides its own
# modules.
PUBLIC_PACKAGES = frozenset({"orion_fsm", "orion_fsm.replay", "orion_fsm.testing",
                             "orion_fsm.http", "orion_fsm.modelops"})
INTERNAL_PACKAGES = frozenset({"orion_fsm.services", "orion_fsm.backends"})


@pytest.mark.parametrize("package", [orion_fsm, orion_fsm.replay, orion_fsm.testing,
                                     orion_fsm.http],
                         ids=lambda p: p.__name__)
def test_every_exported_name_resolves(package: types.ModuleType) -> None:
    missing = [name for name in package.__all__ if not hasattr(package, name)]
    assert missing == []
    assert len(set(package.__all__)) == len(package.__all__)


# --- types in public signatures -------------------------------------------------------------


def _classes_in(hint: object) -> Iterator[type]:
    """Every class a type hint names, through unions, generics, Callable and aliases."""
    if isinstance(hint, list | tuple):  # Callable's parameter list
        for item in hint:
            yield from _classes_in(item)
        return
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return
    if origin is not None:
        if isinstance(origin, type):
            yield origin
        for arg in typing.get_args(hint):
            yield from _classes_in(arg)
        return
    if isinstance(hint, typing.TypeVar):
        for bound in (hint.__bound__, *hint.__constraints__):
            yield from _classes_in(bound)
        return
    if isinstance(hint, type):
        yield hint


# Values callers receive but never construct: their constructor is not public API.
_MADE_BY_THE_ENGINE = frozenset({ResponseStream})


def _signatures(cls: type) -> Iterator[tuple[str, Callable[..., object]]]:
    """`__init__` and the public methods and properties of `cls`, as functions."""
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and (name != "__init__" or cls in _MADE_BY_THE_ENGINE):
            continue
        if isinstance(member, property) and member.fget is not None:
            yield f"{cls.__name__}.{name}", member.fget
        elif inspect.isfunction(member) or inspect.ismethod(member):
            yield f"{cls.__name__}.{name}", member


def _public_types() -> list[tuple[str, type]]:
    found: list[tuple[str, type]] = []
    for cls in (Engine, ResponseStream, Result):
        hints = [(f"{cls.__name__} field", typing.get_type_hints(cls))]
        hints += [(where, typing.get_type_hints(fn)) for where, fn in _signatures(cls)]
        for where, named in hints:
            found += [(f"{where}: {name}", t) for name, hint in named.items()
                      for t in _classes_in(hint)]
    return found


def _ours(t: type) -> bool:
    # Builtins, typing, the standard library and third-party types (opentelemetry's
    # TracerProvider, anyio's) are not ours to export.
    return t.__module__.split(".")[0] == "orion_fsm"


def test_the_signatures_are_walked() -> None:
    """A guard on the walk itself: it reaches types nested in unions and generics."""
    found = {t for _, t in _public_types()}
    assert {orion_fsm.Registry, orion_fsm.GenerationParams, orion_fsm.PhaseTiming,
            orion_fsm.TokenUsage, orion_fsm.Message} <= found


def test_every_type_in_a_public_signature_is_importable_from_orion_fsm() -> None:
    hidden = sorted({f"{where} -> {t.__module__}.{t.__qualname__}"
                     for where, t in _public_types()
                     if _ours(t) and getattr(orion_fsm, t.__name__, None) is not t})
    assert not hidden, "import these from orion_fsm:\n" + "\n".join(hidden)


# --- the CLI is a client of the public API --------------------------------------------------


def _imports(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute name) of what each import of the file takes from a module: the module
    itself, or, from a public package, each name imported from it."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module in PUBLIC_PACKAGES or module == package:
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"
            else:
                yield node.lineno, module


def _private_imports(path: Path, package: str = "orion_fsm.cli") -> list[str]:
    """The imports of `path` (a module of the client layer `package`) that reach into
    orion_fsm past its public packages."""
    found = []
    for line, name in _imports(path, package):
        if name.split(".")[0] != "orion_fsm" or name.startswith(f"{package}."):
            continue
        parent, _, last = name.rpartition(".")
        # A public package, or a name taken from one that is neither private nor internal.
        public = name in PUBLIC_PACKAGES or (
            parent in PUBLIC_PACKAGES and not last.startswith("_")
            and name not in INTERNAL_PACKAGES)
        if not public:
            found.append(f"{path.name}:{line}: {name}")
    return found


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda p: p.name)
def test_the_cli_imports_only_public_names(path: Path) -> None:
    found = _private_imports(path)
    assert not found, "private imports:\n" + "\n".join(found)


@pytest.mark.parametrize("path", sorted(HTTP.glob("*.py")), ids=lambda p: p.name)
def test_the_http_server_imports_only_public_names(path: Path) -> None:
    found = _private_imports(path, "orion_fsm.http")
    assert not found, "private imports:\n" + "\n".join(found)


def test_the_http_import_check_catches_a_private_import(tmp_path: Path) -> None:
    module = tmp_path / "_new_endpoint.py"
    module.write_text("from .._engine import Engine\nfrom ._openai import ApiError\n",
                      encoding="utf-8")
    assert _private_imports(module, "orion_fsm.http") == [
        "_new_endpoint.py:1: orion_fsm._engine"]


@pytest.mark.parametrize("source", [
    "from orion_fsm._engine import default_cache_dir",
    "import orion_fsm._replay",
    "from orion_fsm import _engine",
    "from orion_fsm.services.caches._cacheset import LEVELS",
    "from orion_fsm.services import caches",
    "from orion_fsm.backends import ensure_converted",
    "from orion_fsm.replay._run import replay",
    "from .. import _machine",
    "from .._engine import Engine",
])
def test_the_cli_import_check_catches_a_private_import(tmp_path: Path, source: str) -> None:
    module = tmp_path / "_new_command.py"
    module.write_text(f"{source}\n", encoding="utf-8")
    assert _private_imports(module) != []


@pytest.mark.parametrize("source", [
    "from orion_fsm import Engine, find_traces",
    "from orion_fsm.replay import replay",
    "from orion_fsm.testing import make_tiny_llama_gguf",
    "from ._common import Progress",
    "from . import _trace",
])
def test_the_cli_import_check_lets_public_imports_through(tmp_path: Path, source: str) -> None:
    module = tmp_path / "_new_command.py"
    module.write_text(f"{source}\n", encoding="utf-8")
    assert _private_imports(module) == []


# --- importing orion_fsm stays cheap --------------------------------------------------------


@pytest.mark.parametrize("heavy", [
    "orion_fsm.replay", "torch", "sentence_transformers", "numpy",
    "jsonschema",
])
def test_importing_orion_fsm_leaves_heavy_modules_unloaded(heavy: str) -> None:
    code = f"import sys, orion_fsm; sys.exit({heavy!r} in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
