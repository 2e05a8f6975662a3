"""The repository layout keeps the standard library importable and the CLI working."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_does_not_shadow_stdlib():
    assert not (ROOT / "platform" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import platform, ray; print(platform.system())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Linux"


def test_console_script_help():
    exe = Path(sys.executable).parent / "mvtcae"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MVTCAE" in out.stdout


def test_model_api_imports_lazily():
    code = "import sys, mvtcae; assert 'torch' not in sys.modules; mvtcae.MVTCAE; assert 'torch' in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------------------------
# The layering: one package per concern, imports pointing down only, no cycles.
# --------------------------------------------------------------------------------------------
PACKAGE = ROOT / "platform" / "mvtcae"
LAYERS = {
    "model": 0,  # plain PyTorch + safetensors
    "safety": 1,  # names, redaction, trusted modules
    "config": 2,  # validated sections
    "data": 3,  # shards, validation, Ray Data input
    "storage": 3,  # run locations, checkpoints, run state, the Ray session
    "tracking": 4,  # MLflow runs, registry, pyfunc, loading
    "evaluation": 4,  # probe, coherence, likelihood, plots
    "training": 5,  # step, worker loop, driver
    "cluster": 5,  # the local development cluster
    "sweep": 6,  # study, trial, driver
    "cli": 7,  # the `mvtcae` command
}
# Where importing lazily (inside a function) is allowed, and why: nothing else may hide an import.
LAZY_ALLOWED = {
    "__init__": "`import mvtcae` must not load torch",
    "model": "`import mvtcae.model` (configuration) must not load torch",
    "data": "`import mvtcae.data` (writing, validating) must not load Ray",
    "cli": "`mvtcae --help` must not load torch, Ray or MLflow",
}


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package: Path) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path, package: Path = PACKAGE) -> list[tuple[str, int, bool]]:
    """(imported mvtcae module, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    own = _module_name(path, package)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    nested = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` depends on pkg.sub; `from pkg import Name` on pkg itself.
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "mvtcae" or name.startswith("mvtcae."):
                found.append((name, node.lineno, id(node) in nested))
    return found


def _top(module: str) -> str:
    """The layered package of a dotted name; names the root package re-exports (the model's
    ``MVTCAE``, ...) belong to the root, ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "__init__"


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module that an imported dotted name lives in (``mvtcae.x.y.Name`` -> ``mvtcae.x.y``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the platform modules it imports."""
    paths = _sources(package)
    modules = {_module_name(p, package) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        own = _module_name(path, package)
        targets = {_resolve(name, modules) for name, _, _ in _imports(path, package)}
        graph[own] = {t for t in targets if t and t != own and t != "mvtcae"}
    return graph


def _upward_imports(package: Path = PACKAGE) -> list[str]:
    """Every import of a package in the same or a higher layer than the importer's."""
    upward = []
    for path in _sources(package):
        own = _top(_module_name(path, package))
        own_layer = LAYERS.get(own, 0)  # the root package re-exports the model's API
        for name, line, _ in _imports(path, package):
            target = _top(name)
            if target in ("__init__", own) or (own, target) == ("__init__", "model"):
                continue
            if LAYERS[target] >= own_layer:
                where = f"{path.relative_to(package)}:{line}"
                upward.append(
                    f"{where} ({own}, layer {own_layer}) imports {name} "
                    f"({target}, layer {LAYERS[target]})"
                )
    return upward


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """The import cycles of ``graph``, each as ``a -> b -> a``."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def _strays(package: Path = PACKAGE) -> list[str]:
    """Modules outside the layered packages (the root ``__init__`` aside)."""
    names = [_module_name(p, package) for p in _sources(package)]
    return [n for n in names if n != "mvtcae" and n.split(".")[1] not in LAYERS]


def test_every_module_sits_in_a_layer():
    strays = _strays()
    assert strays == [], f"modules outside the layered packages: {strays}"


def test_imports_point_down_the_layers():
    upward = _upward_imports()
    assert upward == [], "\n".join(upward)


def test_there_are_no_import_cycles():
    cycles = _cycles(_graph())
    assert cycles == [], "\n".join(cycles)


def test_lazy_imports_only_where_they_keep_start_up_light():
    hidden = [
        f"{p.relative_to(PACKAGE)}:{line} imports {name} inside a function"
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts and _top(_module_name(p)) not in LAZY_ALLOWED
        for name, line, lazy in _imports(p)
        if lazy
    ]
    assert hidden == [], "\n".join(hidden)


def test_the_layering_checks_find_what_they_should(tmp_path):
    # A package made to break the rules: the model imports training (upward), and two training
    # modules import each other (a cycle, one side hidden in a function as such cycles are).
    package = tmp_path / "mvtcae"
    files = {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/mvtcae.py": "from mvtcae.training.loop import run\n",
        "training/__init__.py": "",
        "training/loop.py": "from . import step\n\ndef run():\n    pass\n",
        "training/step.py": "def f():\n    from mvtcae.training.loop import run\n",
        "sweep/__init__.py": "from mvtcae.training import loop\n",
    }
    files["helpers.py"] = ""  # a sibling module outside every layer
    for rel, text in files.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    assert _strays(package) == ["mvtcae.helpers"]
    upward = _upward_imports(package)
    assert len(upward) == 1 and upward[0].startswith("model/mvtcae.py:1 (model, layer 0)")
    assert _cycles(_graph(package)) == [
        "mvtcae.training.loop -> mvtcae.training.step -> mvtcae.training.loop"
    ]
    assert LAYERS["model"] < LAYERS["config"] < LAYERS["training"] < LAYERS["sweep"] < LAYERS["cli"]
