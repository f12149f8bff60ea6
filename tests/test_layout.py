"""The project's layout: ecmoe.py stands alone, and the imports run one way.

Layers, bottom to top:  ecmoe.py  <-  moe/  <-  lab/ helpers  <-  train_tiny.py  <-  lab/ tools.
ecmoe.py needs only the standard library and torch, so a student can copy that one file. The
import-graph tests parse (with `ast`, nothing is imported) every .py file of the project that
exists: the top level and every package folder (moe/, lab/, ...); tests/ is not checked. On a
failure they print every violation they found, with file and line.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_PROJECT = {"tests", "notebooks", "assets", "docs", "shared"}  # folders that hold no project modules


# ----------------------------------------------------------------------------- ecmoe.py alone
TRAIN_SCRIPT = r'''
import json, os, sys
import torch
import torch.nn.functional as F
import ecmoe

assert os.path.dirname(os.path.abspath(ecmoe.__file__)) == os.getcwd(), ecmoe.__file__
project = set(json.loads(sys.argv[1]))
print("PROJECT_MODULES", json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in project)))
torch.manual_seed(0)
torch.set_num_threads(1)
V, d, B, T = 16, 32, 16, 8
emb, head = torch.nn.Embedding(V, d), torch.nn.Linear(d, V)
moe = ecmoe.MoE(d, 64, n_experts=4, eval_routing="threshold")
opt = torch.optim.Adam([*emb.parameters(), *moe.parameters(), *head.parameters()], lr=1e-2)
losses = []
for step in range(40):
    ids = torch.randint(V, (B, T))
    x = emb(ids) + emb(ids.roll(1, dims=1))  # predict the previous token: the answer is in x
    loss = F.cross_entropy(head(x + moe(x).y)[:, 1:].reshape(-1, V), ids[:, :-1].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
moe.eval()
y = moe(x[:1]).y  # inference at batch size 1, by the learned thresholds
assert y.shape == (1, T, d) and bool(torch.isfinite(y).all())
print("LOSS", losses[0], losses[-1])
'''


def project_top_names():
    """Top-level import names of the project ('ecmoe', 'moe', 'lab', 'train_tiny', ...)."""
    return sorted({name.split(".")[0] for name in project_modules(ROOT)})


def test_ecmoe_alone_trains_a_tiny_model(tmp_path):
    """ecmoe.py copied ALONE to an empty folder (no PYTHONPATH) trains a tiny model: loss halves in 40 steps."""
    shutil.copy(ROOT / "ecmoe.py", tmp_path / "ecmoe.py")
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "train.py", json.dumps(project_top_names())], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    loaded = json.loads(re.search(r"^PROJECT_MODULES (.*)$", done.stdout, re.M).group(1))
    assert loaded == ["ecmoe"], loaded  # ecmoe itself, nothing else of the project
    first, last = map(float, re.search(r"^LOSS (\S+) (\S+)$", done.stdout, re.M).groups())
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("script", ["ecmoe.py", "reference_numpy.py"])
def test_script_help_prints_usage_quickly(script):
    """`python SCRIPT --help` prints usage and exits 0 within 30 s (it trains or solves nothing)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {script}"), done.stdout[:500]
    assert elapsed < 30, f"{script} --help took {elapsed:.1f} s"


# ----------------------------------------------------------------------------- the import graph
@lru_cache(maxsize=None)
def project_modules(root):
    """{module name: path} of every project .py file under root: the top level, and every folder
    that is a package (has __init__.py) or is moe/ or lab/, except tests/ and non-code folders."""
    modules = {path.stem: path for path in sorted(root.glob("*.py"))}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith((".", "_")) or folder.name in NOT_PROJECT:
            continue
        if not ((folder / "__init__.py").exists() or folder.name in ("moe", "lab")):
            continue
        for path in sorted(folder.rglob("*.py")):
            if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts):
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


class Project:
    """The parsed project under root: its modules, their imports, the graph between them."""

    def __init__(self, root):
        self.root, self.modules = root, project_modules(root)
        self.trees = {m: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for m, p in self.modules.items()}
        self.imports = {m: self._imports_of(m) for m in self.modules}

    def package_of(self, module):
        """The package relative imports start from ('moe.capped' -> 'moe', 'moe' -> 'moe')."""
        return module if self.modules[module].name == "__init__.py" else module.rpartition(".")[0]

    def resolve(self, importer, name):
        """The project module `name` means when `importer` imports it, or None (not the project's).
        A script-style sibling import ('import files' inside lab/) counts as the package's module."""
        if name in self.modules:
            return name
        package = self.package_of(importer)
        if package and f"{package}.{name}" in self.modules:
            return f"{package}.{name}"
        return None

    def where(self, imp, extra=""):
        rel = self.modules[imp.importer].relative_to(self.root).as_posix()
        what = f"from {imp.module} import {imp.name}" if imp.name is not None else f"import {imp.module}"
        return f"{rel}:{imp.line}: {what}{extra}"

    def _imports_of(self, module):
        """Every import in the file, at module level or inside functions, as Import records."""
        found = []
        for node in ast.walk(self.trees[module]):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(module, alias.name, None, alias.asname,
                                        self.resolve(module, alias.name), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = node.module
                if node.level:  # relative: from the importer's package, level-1 packages up
                    package = self.package_of(module).split(".") if self.package_of(module) else []
                    parts = package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])
                    base = ".".join(parts)
                for alias in node.names:
                    target = self.resolve(module, f"{base}.{alias.name}") or self.resolve(module, base)
                    found.append(Import(module, base, alias.name, alias.asname, target, node.lineno))
        return sorted(found, key=lambda imp: imp.line)

    def graph(self):
        """{module: {project module it imports: [Import, ...]}} (self-imports left out)."""
        graph = {}
        for module, imps in self.imports.items():
            edges = graph.setdefault(module, {})
            for imp in imps:
                if imp.target is not None and imp.target != module:
                    edges.setdefault(imp.target, []).append(imp)
        return graph


class Import:
    """One imported name: `module` (dotted, absolute), `name` (for `from module import name`, else
    None), `asname`, the project module it reaches (`target`, or None), and its line."""

    def __init__(self, importer, module, name, asname, target, line):
        self.importer, self.module, self.name, self.asname = importer, module, name, asname
        self.target, self.line = target, line


def is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def strongly_connected(graph):
    """Tarjan: the strongly connected components of graph {node: iterable of nodes}."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


# each rule: Project -> list of violations, one line each ("file:line: what")
def import_cycles(project):
    """(a) circles of imports among project modules (module-level and function-level alike)."""
    graph, found = project.graph(), []
    for component in strongly_connected(graph):
        if len(component) > 1:
            edges = [project.where(imp) for a in component for b in component for imp in graph[a].get(b, [])]
            found.append(" <-> ".join(component) + ": " + "; ".join(edges))
    return found


def private_names_across_files(project):
    """(b) `from X import _name` and `X._name` where X is another project module."""
    found = []
    for module, imps in project.imports.items():
        bound = {}  # local name -> the project module it refers to (file-wide, all scopes)
        for imp in imps:
            if imp.name is None and imp.asname:  # import a.b as n: n is a.b
                if imp.target:
                    bound[imp.asname] = imp.target
            elif imp.name is None:  # import a.b: binds a
                top = imp.module.split(".")[0]
                if project.resolve(module, top):
                    bound[top] = project.resolve(module, top)
            else:  # from X import name [as n]
                if imp.target is not None and imp.target != module and is_private(imp.name):
                    found.append(project.where(imp))
                submodule = project.resolve(module, f"{imp.module}.{imp.name}")
                if submodule:  # from pkg import mod: binds a module
                    bound[imp.asname or imp.name] = submodule
        for node in ast.walk(project.trees[module]):
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in bound:
                continue
            target = bound[base.id]
            for attr in chain:
                if f"{target}.{attr}" in project.modules:
                    target = f"{target}.{attr}"
                    continue
                if is_private(attr) and target != module:
                    rel = project.modules[module].relative_to(project.root).as_posix()
                    found.append(f"{rel}:{node.lineno}: {base.id}.{'.'.join(chain)} ({target}.{attr})")
                break
    return sorted(set(found), key=lambda v: (v.split(":")[0], int(v.split(":")[1])))


def ecmoe_beyond_stdlib_and_torch(project):
    """(c) ecmoe.py importing anything but the standard library and torch, or torch.distributed."""
    if "ecmoe" not in project.modules:
        return ["ecmoe.py is missing"]
    found = []
    for imp in project.imports["ecmoe"]:
        full = imp.module + (f".{imp.name}" if imp.name else "")
        top = imp.module.split(".")[0]
        if imp.target is not None or not (top == "torch" or top in sys.stdlib_module_names):
            found.append(project.where(imp))
        elif full == "torch.distributed" or full.startswith("torch.distributed."):
            found.append(project.where(imp, "  (torch.distributed)"))
    for node in ast.walk(project.trees["ecmoe"]):
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.append(f"ecmoe.py:{node.lineno}: torch.distributed used")
    return found


def moe_beyond_ecmoe_and_moe(project):
    """(d) a file in moe/ importing a project module other than ecmoe and moe.*."""
    return [project.where(imp, f"  (-> {imp.target})")
            for module, imps in project.imports.items() if module == "moe" or module.startswith("moe.")
            for imp in imps
            if imp.target is not None and not (imp.target in ("ecmoe", "moe") or imp.target.startswith("moe."))]


def train_tiny_lab_loops(project):
    """(e) train_tiny.py importing a lab/ module that itself imports train_tiny."""
    graph = project.graph()
    found = []
    for lab_module, imps in graph.get("train_tiny", {}).items():
        if lab_module == "lab" or lab_module.startswith("lab."):
            found += [f"{project.where(imps[0])}  but  {project.where(back)}"
                      for back in graph.get(lab_module, {}).get("train_tiny", [])]
    return found


def report(title, violations):
    """Print and fail with every violation, or pass quietly."""
    if violations:
        text = f"{title} ({len(violations)}):\n  " + "\n  ".join(violations)
        print(text)
        pytest.fail(text, pytrace=False)


@lru_cache(maxsize=None)
def this_project():
    return Project(ROOT)


def test_project_files_are_found():
    """The graph tests see the files they are about: ecmoe.py and every file of moe/."""
    modules = this_project().modules
    assert "ecmoe" in modules and "moe.token_choice" in modules and "moe.routers" in modules
    assert not any(name.split(".")[0] == "tests" for name in modules)


def test_no_import_cycles_among_project_modules():
    """(a) No circle of imports among project modules (module-level and function-level alike)."""
    report("import cycles", import_cycles(this_project()))


def test_no_underscore_names_across_files():
    """(b) No `from X import _name` and no `X._name` where X is another project module."""
    report("private names used across files", private_names_across_files(this_project()))


def test_ecmoe_imports_only_the_standard_library_and_torch():
    """(c) ecmoe.py imports the standard library and torch only, and not torch.distributed."""
    report("ecmoe.py imports beyond the standard library and torch", ecmoe_beyond_stdlib_and_torch(this_project()))


def test_moe_files_import_only_ecmoe_and_moe():
    """(d) A file in moe/ imports nothing of the project but ecmoe and moe.*."""
    report("moe/ files importing project modules other than ecmoe and moe.*", moe_beyond_ecmoe_and_moe(this_project()))


def test_train_tiny_imports_no_lab_module_that_imports_it():
    """(e) train_tiny.py imports no lab/ module that itself imports train_tiny (helpers below, tools above)."""
    report("train_tiny.py imports lab modules that import train_tiny", train_tiny_lab_loops(this_project()))


FAKE_PROJECT = {  # one violation of each rule, and legal imports that must not be flagged
    "ecmoe.py": "import math\nimport numpy\nimport torch\nimport torch.distributed as dist\n"
                "from torch import nn\nimport moe\n\ndef f():\n    return torch.distributed.is_available()\n",
    "moe/__init__.py": "",
    "moe/a.py": "import ecmoe\nfrom moe import b\nfrom moe.b import public, _private\n"
                "from . import c\nfrom lab import helper\n\ndef g():\n    return b._hidden + b.__name__\n",
    "moe/b.py": "def f():\n    import moe.c\n    return moe.c._x\n",
    "moe/c.py": "def h():\n    from moe import b\n",
    "lab/__init__.py": "",
    "lab/helper.py": "import ecmoe\n",
    "lab/tool.py": "import train_tiny as tt\nimport files\nprint(tt._secret, files._y, tt.__file__)\n",
    "lab/files.py": "",
    "train_tiny.py": "from lab import helper, tool\nfrom ecmoe import _check\n",
    "tests/test_x.py": "import train_tiny\ntrain_tiny._anything\nimport ecmoe\n",
}


def test_the_layout_rules_catch_each_violation(tmp_path):
    """Each rule flags exactly the violations planted in a fake project (and nothing legal)."""
    for name, text in FAKE_PROJECT.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    project = Project(tmp_path)
    assert "tests.test_x" not in project.modules and "lab.files" in project.modules
    assert [c.split(":")[0] for c in import_cycles(project)] == ["lab.tool <-> train_tiny", "moe.b <-> moe.c"]
    assert [v.split(": ")[0] for v in private_names_across_files(project)] == [
        "lab/tool.py:3", "lab/tool.py:3", "moe/a.py:3", "moe/a.py:8", "moe/b.py:3", "train_tiny.py:2"]
    assert [v.split(": ")[0] for v in ecmoe_beyond_stdlib_and_torch(project)] == [
        "ecmoe.py:2", "ecmoe.py:4", "ecmoe.py:6", "ecmoe.py:9"]
    assert moe_beyond_ecmoe_and_moe(project) == ["moe/a.py:5: from lab import helper  (-> lab.helper)"]
    assert [v.split(": ")[0] for v in train_tiny_lab_loops(project)] == ["train_tiny.py:1"]
