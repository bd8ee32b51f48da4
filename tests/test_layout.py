"""The repository's shape: imports flow one way (library -> pipelines -> tools, and inside the library
core -> models -> data -> checkpoint -> eval -> train), there are no import cycles (function-level
imports included), nothing imports a private name of another module, importing the config loads no
model library, and every document the code and docs refer to is in the repository."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TOP = ("t2i", "pipelines", "tools")
LAYER = {"t2i": 0, "pipelines": 1, "tools": 2}  # a module may import its own layer or lower ones
# Inside the library: a module may import its own sub-package or a lower one. Core = t2i/*.py.
SUBPACKAGE = {"core": 0, "models": 1, "data": 2, "checkpoint": 3, "eval": 4, "train": 5}
DISPATCHER = "t2i.cli"  # the command line dispatches to pipelines/ and tools/: the one exception


def modules() -> dict[str, Path]:
    out = {}
    for top in TOP:
        for path in sorted((REPO / top).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of the project's own modules,
    at any depth of the file (function-level imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] in TOP]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in TOP:
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub, None, node.lineno) if sub in known else (node.module, a.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _, _ in imports(path, known) if m in known and m != name} for name, path in known.items()}


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def subpackage(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else "core"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert find_cycles(graph()) == []


def test_imports_flow_one_way_between_layers():
    upward = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
              if a != DISPATCHER and LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert upward == []


def test_the_library_subpackages_import_downward_only():
    g = graph()
    assert set(SUBPACKAGE) >= {subpackage(m) for m in g if m.startswith("t2i.") and m != DISPATCHER}
    upward = [f"{a} -> {b}" for a, deps in g.items() if a.startswith("t2i.") and a != DISPATCHER
              for b in deps if b.startswith("t2i.") and SUBPACKAGE[subpackage(b)] > SUBPACKAGE[subpackage(a)]]
    assert upward == []


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    private = [f"{path.relative_to(REPO)}:{line}: {module}.{name}" for path in known.values()
               for module, name, line in imports(path, known) if name and name.startswith("_")]
    assert private == []


def test_importing_the_config_loads_no_model_library():
    code = ("import sys, t2i.config, t2i.errors, t2i.cli; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'deepspeed', 'webdataset') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


DOC_REF = re.compile(r"\b((?:docs|slurm|configs|tools|pipelines|t2i|tests)/[\w./-]+\.(?:md|py|sh|yaml|sbatch))")


@pytest.mark.parametrize("folder", ["t2i", "pipelines", "tools", "slurm", "docs", "configs"])
def test_every_referenced_file_is_in_the_repository(folder):
    files = [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".sh", ".sbatch", ".yaml")]
    files += [REPO / "README.md", REPO / "Makefile"] if folder == "docs" else []
    missing = sorted({f"{p.relative_to(REPO)}: {ref}" for p in files for ref in DOC_REF.findall(p.read_text())
                      if not (REPO / ref).exists() and "<" not in ref and "*" not in ref})
    assert missing == []


def test_no_document_outside_the_repository_is_cited():
    outside = re.compile(r"\.\./shared|\b(?:DESIGN|EVALUATORS|SLURM_NOTES|ENV_NOTES|MIXFLOW_PAPER|STYLE)\.md")
    files = [p for top in ("t2i", "pipelines", "tools", "slurm", "docs", "configs") for p in (REPO / top).rglob("*")
             if p.suffix in (".py", ".md", ".sh", ".sbatch", ".yaml")] + [REPO / "README.md", REPO / "Makefile"]
    cited = sorted(f"{p.relative_to(REPO)}" for p in files if outside.search(p.read_text()))
    assert cited == []
