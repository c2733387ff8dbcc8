"""The code layout ARCHITECTURE.md describes holds: no import cycle (Python modules, C++ headers), the library core
never imports the applications, no module imports another's private names, and every activation is defined on
both sides."""

import ast
from pathlib import Path

import nestsparse
from nestsparse.activations import ACTIVATIONS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "nestsparse"
CSRC = ROOT / "csrc"
APPS = "nestsparse.apps"
# Written by the build, not in the source tree: the build record.
GENERATED = {"nestsparse._build_info"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_modules() -> dict[str, Path | None]:
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if module_name(p) not in GENERATED}
    return {**modules, **dict.fromkeys(GENERATED)}


def imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported nestsparse module, names taken from it) for every import statement of the module, at any depth
    (imports inside functions count: they run too). ``from . import x`` imports the submodule x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "nestsparse"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "nestsparse":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            out += [(m, []) for m in submodules]
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest or not submodules:
                out.append((target, rest))
    return out


def graph() -> dict[str, set[str]]:
    modules = python_modules()
    return {
        name: {target for target, _ in imports(name, path, modules) if target in modules and target != name}
        for name, path in modules.items()
        if path is not None
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph, as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_python_modules_import_no_cycle():
    edges = graph()
    assert "nestsparse.formats.base" in edges and edges["nestsparse.nn.sparse"]  # the scan sees the package
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_core_never_imports_the_applications():
    for name, targets in graph().items():
        if name.startswith(APPS) or name == "nestsparse.__main__":  # the command-line entry runs the apps
            continue
        bad = sorted(t for t in targets if t.startswith(APPS))
        assert not bad, f"{name} (library core) imports {bad}; the core must not depend on nestsparse.apps"


def test_no_private_name_is_imported_from_another_module():
    modules = python_modules()
    for name, path in modules.items():
        if path is None:
            continue
        for target, names in imports(name, path, modules):
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            assert not private, f"{name} imports private names {private} from {target}"


def cpp_includes() -> dict[str, set[str]]:
    files = {p.relative_to(CSRC).as_posix(): p for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".inc")}
    edges = {}
    for name, path in files.items():
        found = set()
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith('#include "'):
                inc = line.split('"')[1]
                local = (path.parent / inc).relative_to(CSRC).as_posix() if (path.parent / inc).exists() else inc
                if local in files:
                    found.add(local)
        edges[name] = found
    return edges


def test_cpp_headers_include_no_cycle():
    edges = cpp_includes()
    assert "ops/linear.h" in edges["ops/cpu/linear.cpp"]  # the scan sees the includes
    assert find_cycle(edges) is None, f"include cycle: {' -> '.join(find_cycle(edges))}"


def test_activations_agree_between_python_and_the_library():
    assert tuple(ACTIVATIONS) == tuple(nestsparse.native.activations())
    for name, act in ACTIVATIONS.items():
        assert act is None or act.matches(act.module()), name
