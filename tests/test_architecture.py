"""The layout's rules that import-linter does not check (``docs/architecture.md``).

import-linter (run by ``scripts/test.sh``) holds the layers, the cycles and the private modules.
These tests hold the names: no module takes a private name from another, every name a module
takes from a sibling is in that sibling's ``__all__``, and the package's public API is what its
``__init__`` exports.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import shanoir_dicomweb_proxy

PACKAGE = Path(shanoir_dicomweb_proxy.__file__).parent


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, imported module, name) for every ``from X import name`` of the project."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = _package_of(module, path).split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        if target.split(".")[0] != "shanoir_dicomweb_proxy":
            continue
        for alias in node.names:
            yield node.lineno, target, alias.name


def _all_of(path: Path) -> set[str] | None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    return None


def _path_of(module: str) -> Path | None:
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / relative / "__init__.py", PACKAGE / relative.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def test_no_private_name_is_imported_from_another_module() -> None:
    found = [
        f"{module}:{line} takes {name} from {target}"
        for module, path in _modules()
        for line, target, name in _imports(module, path)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert found == []


def test_every_imported_name_is_in_its_modules_all() -> None:
    missing = []
    for module, path in _modules():
        for line, target, name in _imports(module, path):
            target_path = _path_of(target)
            if target_path is None or _path_of(f"{target}.{name}") is not None:
                continue  # a submodule, not a name
            exported = _all_of(target_path)
            if exported is not None and name not in exported and not name.startswith("__"):
                missing.append(f"{module}:{line} takes {name}, not in {target}.__all__")
    assert missing == []


def test_the_public_api_is_what_init_exports() -> None:
    exported = _all_of(PACKAGE / "__init__.py")
    assert exported is not None
    assert set(shanoir_dicomweb_proxy.__all__) == exported
    missing = [name for name in exported if not hasattr(shanoir_dicomweb_proxy, name)]
    assert missing == []
    public_modules = [
        path.name
        for path in PACKAGE.iterdir()
        if not path.name.startswith(("_", ".")) and path.name != "py.typed"
    ]
    assert public_modules == ["testing"]  # the test bed, documented on its own


def test_docs_import_only_the_public_api() -> None:
    docs = [*(PACKAGE.parent.parent / "docs").glob("*.md"), PACKAGE.parent.parent / "README.md"]
    offending = [
        f"{doc.name}: {line.strip()}"
        for doc in docs
        for line in doc.read_text(encoding="utf-8").splitlines()
        if "shanoir_dicomweb_proxy._" in line
    ]
    assert offending == []


ARCHITECTURE = PACKAGE.parent.parent / "docs" / "architecture.md"
#: Too small to name: the ASGI type aliases, the version, the entry points.
_UNNAMED = frozenset(
    {"__init__.py", "__main__.py", "__pycache__", "py.typed", "_types.py", "_version.py"}
)


def test_architecture_names_every_part_of_the_package() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    parts = [
        f"{path.name}/" if path.is_dir() else path.name
        for path in PACKAGE.iterdir()
        if path.name not in _UNNAMED
    ]
    assert [part for part in parts if part not in text] == []


def test_architecture_shows_the_layers_of_the_contract() -> None:
    pyproject = tomllib.loads((PACKAGE.parent.parent / "pyproject.toml").read_text())
    contract = next(
        c for c in pyproject["tool"]["importlinter"]["contracts"] if c["type"] == "layers"
    )
    text = ARCHITECTURE.read_text(encoding="utf-8")
    block = text.split("## The dependency rule", 1)[1].split("```")[1].strip().splitlines()
    shown = [line.split("   ")[0].strip() for line in block]
    assert shown == contract["layers"]
