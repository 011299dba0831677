"""The import graph: no cycle (imports inside functions included) in the library, the app or the benchmarks; in the
library `decomposition.py` at the bottom, integrations above the core and never imported by it; the library never
imports the app (`idlora_trl_app`) or the benchmarks; an `IDLoRAConfig` never starts the plugin manager, and
importing the library changes no environment variable and loads no matplotlib."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "idlora_trl"
APP = ROOT / "idlora_trl_app"
BENCHMARKS = ROOT / "benchmarks"
LIBRARY = ((PACKAGE, "idlora_trl"), (ROOT / "integrations", "idlora_trl.integrations"))
EVERYTHING = (*LIBRARY, (APP, "idlora_trl_app"), (BENCHMARKS, "benchmarks"))


def module_name(path: Path, package: Path = PACKAGE, name: str | None = None) -> str:
    """The dotted name of `path` in `package` (whose own name is `name`, default its folder's)."""
    parts = (name or package.name, *path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(*packages: tuple[Path, str]) -> dict[str, set[str]]:
    """Module -> the modules of `packages` ((folder, dotted name) pairs; default `idlora_trl` alone) it imports
    anywhere in its body (top level, functions, try blocks)."""
    packages = packages or ((PACKAGE, "idlora_trl"),)
    files = {module_name(p, folder, name): p for folder, name in packages for p in folder.rglob("*.py")}
    roots = tuple(name for _, name in packages)
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from . import trainers` imports the submodule; `from .. import get_indices` the package
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if any(target == root or target.startswith(root + ".") for root in roots):
                    edges.add(target)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_parser_sees_imports_inside_functions():
    graph = import_graph(*EVERYTHING)
    assert "idlora_trl_app.smollm2" in graph["idlora_trl_app.cli.demo"]  # imported inside main() only
    assert "idlora_trl.trainers" in graph["idlora_trl"]  # the lazy trainer import


def test_no_import_cycle_in_the_library_the_app_and_the_benchmarks():
    graph = import_graph(*EVERYTHING)
    assert "idlora_trl.settings" in graph["idlora_trl_app.cli.arguments"]  # the app's edges into the library count
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_app():
    """The app (the command, built-in data, evaluation, SmolLM2, the picture) sits on top of the library."""
    graph = import_graph(*EVERYTHING)
    assert any(e.startswith("idlora_trl_app.") for e in graph["idlora_trl_app.cli.sft"])  # the graph sees them
    wrong = {module: sorted(e for e in edges if e.partition(".")[0] == "idlora_trl_app")
             for module, edges in graph.items() if module.partition(".")[0] == "idlora_trl"}
    assert not any(wrong.values()), {m: e for m, e in wrong.items() if e}


def test_importing_the_library_changes_no_environment_and_loads_no_matplotlib():
    code = ("import os, sys\nbefore = dict(os.environ)\n"
            "import idlora_trl, idlora_trl.trainers, idlora_trl.integrations.deepspeed.plugin\n"
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
            "print(changed, 'matplotlib' in sys.modules)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    for argv0 in ("-c", "idlora-trl"):  # as a script, and as if it were the command's process
        command = [sys.executable, "-c", code] if argv0 == "-c" else [sys.executable, "-c",
                                                                      "import sys; sys.argv[0] = 'idlora-trl'\n" + code]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "[] False", result.stdout


def test_decomposition_is_the_bottom_and_integrations_stay_outside():
    graph = import_graph()
    assert graph["idlora_trl.assignment"] == set()  # the exact assignment step, pure torch/numpy
    assert graph["idlora_trl.decomposition"] == {"idlora_trl.assignment"}
    assert graph["idlora_trl.hookspecs"] == set() and graph["idlora_trl.peft_type"] == set()
    assert graph["idlora_trl.variants"] == set()  # the routers' arithmetic, merging and overflow check, pure torch
    assert graph["idlora_trl.fused"] == {"idlora_trl.variants"}  # the adapted forward's autograd node
    assert graph["idlora_trl.config"] == {"idlora_trl.decomposition", "idlora_trl.peft_type", "idlora_trl.model_card"}
    assert graph["idlora_trl.model_card"] == set() and graph["idlora_trl.loading"] == set()  # leaves, like fused
    for module, edges in graph.items():
        assert not any(e.startswith("idlora_trl.integrations") for e in edges), module
    # the layer knows nothing of plugins, clustering orchestration or registration
    below_layer = {"idlora_trl.config", "idlora_trl.decomposition", "idlora_trl.precision", "idlora_trl.peft_type",
                   "idlora_trl.fused", "idlora_trl.loading", "idlora_trl.variants"}
    assert graph["idlora_trl.layer"] <= below_layer


def test_the_benchmarks_graph_is_read():
    graph = import_graph(*EVERYTHING)
    assert "benchmarks.clustering.gpu" in graph["benchmarks.gpu_check.measure"]  # `from benchmarks.x import y`
    assert "benchmarks.common" in graph["benchmarks.cli"]  # imported inside main(), after the thread variables


def test_neither_the_library_nor_the_app_imports_the_benchmarks():
    """The benchmark suite is not in the wheel: nothing of the library (core or integrations) or the app may import
    it."""
    graph = import_graph(*EVERYTHING)
    assert any(e.startswith("benchmarks.") for e in graph["benchmarks.quality.measure"])  # the graph sees them
    wrong = {module: sorted(e for e in edges if e == "benchmarks" or e.startswith("benchmarks."))
             for module, edges in graph.items() if module.startswith("idlora_trl")}
    assert not any(wrong.values()), {m: e for m, e in wrong.items() if e}


def test_building_a_config_does_not_start_the_plugin_manager():
    code = (
        "import idlora_trl\n"
        "from idlora_trl.plugins import get_plugin_manager\n"
        "idlora_trl.IDLoRAConfig(r=8, num_clusters=2, selection='pmrc-qr')\n"
        "idlora_trl.IDLoRAConfig(selection='some-plugin-strategy')\n"
        "assert get_plugin_manager.cache_info().currsize == 0, 'the plugin manager was started'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
