"""The import layering: sans-I/O core <- Trio shell -> loader, never upward.

Checked on the source (every import statement, including ones inside functions), so a lazy
import cannot sneak past the rule the way it would past an import-time check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Modules the sans-I/O core must never import: I/O, event loops, clocks, logging, upper layers.
SANSIO_FORBIDDEN = {
    "trio",
    "socket",
    "ssl",
    "select",
    "selectors",
    "asyncio",
    "logging",
    "time",
    "os",
    "subprocess",
    "threading",
    "trio_sni_loader",
    "dns",
}
#: The loader knows nothing about proxies or Trio.
LOADER_FORBIDDEN = {"trio", "trio_sni", "asyncio"}
#: cffi stays in the syscall layer; everything above it passes ints, bytes and typed helpers.
CFFI_HOME = ROOT / "loader" / "trio_sni_loader" / "_sys"
#: The syscall layer's own test compares its C layouts with the UAPI header, through cffi.
CFFI_TESTS = {ROOT / "tests" / "loader" / "test_sys.py"}


def imports_of(path: Path) -> set[str]:
    """Top-level module names imported by ``path``; relative imports resolved to a package."""
    tree = ast.parse(path.read_text("utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module)
            elif node.level:
                package = path.parent
                for _ in range(node.level - 1):
                    package = package.parent
                relative = package.relative_to(ROOT).as_posix().replace("/", ".")
                if node.module:
                    names.add(f"{relative}.{node.module}")
                else:  # ``from .. import accel``: the modules named
                    names.update(f"{relative}.{alias.name}" for alias in node.names)
    return names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", python_files("trio_sni/sansio"), ids=lambda p: p.name)
def test_sansio_does_no_io(path: Path) -> None:
    bad = set()
    for name in imports_of(path):
        top = name.split(".")[0]
        if top in SANSIO_FORBIDDEN:
            bad.add(name)
        if name.startswith("trio_sni.") and not name.startswith("trio_sni.sansio"):
            bad.add(name)
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", python_files("loader"), ids=lambda p: p.name)
def test_loader_knows_nothing_about_the_proxy(path: Path) -> None:
    bad = {n for n in imports_of(path) if n.split(".")[0] in LOADER_FORBIDDEN}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_accel_imports_the_loader() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in python_files("trio_sni")
        if "accel" not in path.parts
        and any(n.split(".")[0] == "trio_sni_loader" for n in imports_of(path))
    ]
    assert offenders == []


def cffi_uses(path: Path) -> set[str]:
    """What in ``path`` reaches cffi: importing it or the loader's FFI module, or naming ``ffi``."""
    found = {
        name
        for name in imports_of(path)
        if name.split(".")[0] == "cffi" or name.split(".")[-1] == "_ffi"
    }
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.alias) and node.name.split(".")[-1] in ("ffi", "_ffi"):
            found.add(f"import of {node.name}")
        elif isinstance(node, ast.Name) and node.id == "ffi":
            found.add("ffi")
        elif isinstance(node, ast.Attribute) and node.attr == "ffi":
            found.add(".ffi")
    return found


def test_cffi_stays_in_the_syscall_layer() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(uses)
        for package in ("loader", "trio_sni", "bench", "fuzz", "tests")
        for path in python_files(package)
        if not path.is_relative_to(CFFI_HOME) and path not in CFFI_TESTS
        if (uses := cffi_uses(path))
    }
    assert offenders == {}


def test_public_names_are_reexported() -> None:
    import trio_sni
    import trio_sni.sansio as sansio

    assert {"Proxy", "Config", "load_config", "TrioSniError", "__version__"} <= set(dir(trio_sni))
    for name in ("ClientHelloReader", "Policy", "ClientLimiter", "refusal_reason", "load_config"):
        assert hasattr(sansio, name), name


#: What the forwarders may use from the rest of the shell: the data plane, the error family,
#: the config and the fd-borrowing helper. A connection's walk goes down from ``server`` to
#: ``forward/`` and never back up.
FORWARD_MAY_USE = (
    "trio_sni.forward",
    "trio_sni.accel",
    "trio_sni.errors",
    "trio_sni.sansio",
    "trio_sni._fd",
)


@pytest.mark.parametrize("path", python_files("trio_sni/forward"), ids=lambda p: p.name)
def test_forwarders_do_not_reach_back_up(path: Path) -> None:
    bad = {
        name
        for name in imports_of(path)
        if name.split(".")[0] == "trio_sni" and not name.startswith(FORWARD_MAY_USE)
    }
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_status_and_metrics_do_not_import_each_other() -> None:
    """Both read the kernel features' status model below them (trio_sni.features), so
    neither needs the other: /metrics is one registry the status server is handed."""
    status = imports_of(ROOT / "trio_sni/status.py")
    metrics = imports_of(ROOT / "trio_sni/metrics.py")
    assert not {n for n in status if n.startswith("trio_sni.metrics")}
    assert not {n for n in metrics if n.startswith("trio_sni.status")}


#: What the kernel features must not use: the proxy that runs them, what reads their reports,
#: and the connection handler (a feature knows listeners, never connections).
FEATURES_MUST_NOT_USE = (
    "trio_sni.server",
    "trio_sni.status",
    "trio_sni.metrics",
    "trio_sni.connection",
)


@pytest.mark.parametrize("path", python_files("trio_sni/features"), ids=lambda p: p.name)
def test_features_do_not_reach_back_up(path: Path) -> None:
    bad = {name for name in imports_of(path) if name.startswith(FEATURES_MUST_NOT_USE)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
