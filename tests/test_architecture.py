"""The import graph keeps the layers pointing one way: config <- common <- models <- data / transfer <- training <-
entry scripts; and no test module imports another (shared builders live in tests/helpers.py, growth_pairs.py,
conftest.py). Read from the source (imports inside functions count), so a lazy import cannot hide a cycle."""
import ast
import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "models", "data", "transfer", "training")
ENTRY_SCRIPTS = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")} - {"config"}
# what each layer may import from the project; entry scripts and bench/ may import anything below them
MAY_IMPORT = {
    "common": set(),
    "config": set(),
    "models": {"config", "common"},
    "data": {"config", "common", "models"},
    "transfer": {"config", "common", "models", "data"},
    "training": {"config", "common", "models", "data", "transfer"},
}


def project_modules() -> dict[str, str]:
    """module name -> file, for config.py, the packages and the entry scripts."""
    found = {"config": os.path.join(ROOT, "config.py")}
    found.update({name: os.path.join(ROOT, f"{name}.py") for name in ENTRY_SCRIPTS})
    found.update({f"bench.{f[:-3]}": os.path.join(ROOT, "bench", f) for f in os.listdir(os.path.join(ROOT, "bench"))
                  if f.endswith(".py")})
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    found[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return found


MODULES = project_modules()


def find_test_modules() -> dict[str, str]:
    """module name -> file of every test module (tests/**/test_*.py), e.g. tests.data.test_data."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3]
                found[rel.replace(os.sep, ".")] = os.path.join(folder, f)
    return found


TEST_MODULES = find_test_modules()


@functools.lru_cache(maxsize=None)
def tree_of(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read())


def imports_of(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in the module, nested ones included."""
    tree = tree_of(MODULES[module])
    package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in parts + [base] if p)
            for a in node.names:  # `from pkg import module` imports a module, not a name
                if f"{base}.{a.name}" in MODULES:
                    out.append((f"{base}.{a.name}", []))
                else:
                    out.append((base, [a.name]))
    return [(m, names) for m, names in out if m in MODULES or m.split(".")[0] in MODULES
            or m.split(".")[0] in PACKAGES]


def layer(module: str) -> str:
    top = module.split(".")[0]
    return "entry" if top in ENTRY_SCRIPTS or top == "bench" else top


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{m} imports {dep}" for m in MODULES if layer(m) in MAY_IMPORT
              for dep, _ in imports_of(m) if layer(dep) != layer(m) and layer(dep) not in MAY_IMPORT[layer(m)]]
    assert not upward, upward


SELF_CONTAINED = ("training.run_state", "training.parallel", "training.reporting")  # below the rest of training/


def test_the_lower_folders_of_training_import_nothing_else_from_it():
    upward = [f"{m} imports {dep}" for m in MODULES for folder in SELF_CONTAINED if m.startswith(folder + ".")
              for dep, _ in imports_of(m) if dep.startswith("training") and not dep.startswith(folder)]
    assert not upward, upward


def test_no_import_cycle_between_files():
    graph = {m: {dep for dep, _ in imports_of(m) if dep in MODULES and dep != m
                 and not (MODULES[dep].endswith("__init__.py") and m.startswith(dep + "."))} for m in MODULES}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_module_takes_another_modules_private_names():
    private = [f"{m} takes {dep}.{n}" for m in MODULES for dep, names in imports_of(m) for n in names
               if n.startswith("_") and dep != m]
    attribute_use = []
    for m in MODULES:  # module._name through an imported module
        tree = tree_of(MODULES[m])
        imported = {a.asname or a.name for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in imported
                    and f"{node.value.id}" not in ("torch", "os", "sys", "dist", "F", "np")):
                attribute_use.append(f"{m} uses {node.value.id}.{node.attr}")
    assert not private + attribute_use, private + attribute_use


def imported_names(path: str) -> set[str]:
    """Every module an import in the file may name: `import a.b`, `from a import b` (a, a.b), relative ones too."""
    names = set()
    for node in ast.walk(tree_of(path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names)
    return names


def imports_between_tests() -> list[str]:
    """'A imports B' for every test module A that imports another test module B."""
    by_basename = {name.rpartition(".")[2]: name for name in TEST_MODULES}
    taken = []
    for module, path in TEST_MODULES.items():
        package = module.rpartition(".")[0]
        for name in imported_names(path):
            dots = len(name) - len(name.lstrip("."))
            if dots:  # relative: resolve against the test module's package
                parts = package.split(".")
                name = ".".join(parts[: len(parts) - dots + 1] + [name.lstrip(".")])
            if name in TEST_MODULES:
                target = name
            elif name in by_basename and not os.path.exists(os.path.join(ROOT, f"{name}.py")):
                target = by_basename[name]  # a bare name, as prepend mode imports; not an entry script's name
            else:
                continue
            if target != module:
                taken.append(f"{module} imports {target}")
    return taken


def test_no_test_module_imports_another():
    taken = imports_between_tests()
    assert not taken, f"{taken}: move what they share to tests/helpers.py, tests/growth_pairs.py or conftest.py"


def test_the_checker_sees_a_cycle_an_upward_import_and_a_private_name(tmp_path, monkeypatch):
    """The rules above can fail: on a planted tree they find each kind of violation."""
    fake = {"config": tmp_path / "config.py", "models.a": tmp_path / "a.py", "training.b": tmp_path / "b.py"}
    fake["config"].write_text("")
    fake["models.a"].write_text("def f():\n    from training.b import _hidden\n")
    fake["training.b"].write_text("from models.a import f\n_hidden = 1\n")
    fake["training.run_state.c"] = tmp_path / "c.py"
    fake["training.run_state.c"].write_text("from training.b import f\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {k: str(v) for k, v in fake.items()})
    for rule in (test_no_module_imports_a_layer_above_its_own, test_no_import_cycle_between_files,
                 test_no_module_takes_another_modules_private_names,
                 test_the_lower_folders_of_training_import_nothing_else_from_it):
        try:
            rule()
        except AssertionError:
            continue
        raise AssertionError(f"{rule.__name__} passed a planted violation")


def test_the_checker_sees_a_test_module_importing_another(tmp_path, monkeypatch):
    """Each way of naming another test module is found: dotted, bare (prepend mode), relative, inside a function;
    a builder module and an entry script that merely starts with test_ are not."""
    files = {"tests.a.test_one": "X = 1\n",
             "tests.a.test_clean": "from tests.helpers import ROOT\nimport test_growth_checks\n",
             "tests.b.test_dotted": "from tests.a.test_one import X\n", "tests.b.test_bare": "from test_one import X\n",
             "tests.a.test_relative": "from .test_one import X\n", "tests.c.test_growth_checks": "",
             "tests.b.test_lazy": "def f():\n    from tests.a import test_one\n"}
    fake = {}
    for name, text in files.items():
        fake[name] = str(tmp_path / f"{name}.py")
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "TEST_MODULES", fake)
    found = {line.split(" imports ")[0] for line in imports_between_tests()}
    assert found == {"tests.b.test_dotted", "tests.b.test_bare", "tests.a.test_relative", "tests.b.test_lazy"}, found
    with pytest.raises(AssertionError, match="test_dotted imports tests.a.test_one"):
        test_no_test_module_imports_another()
