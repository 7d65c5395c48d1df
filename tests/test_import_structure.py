"""The package's import structure: extension points are registered, not imported.

The module graph is read from the source with ``ast`` (every ``import`` and ``from ... import``, also
inside functions, relative ones resolved), so a lazy import cannot hide a dependency. A package's
``__init__`` importing its own submodules is an edge like any other; the implicit import of a parent
package that Python runs before a submodule is not (with it every package would be a cycle).
"""

import ast
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import hasten
from hasten.generate import options_for_model, options_for_schedule
from hasten.models import zoo
from hasten.solvers import OPTION_RESOLVERS, get_solver

SRC = pathlib.Path(hasten.__file__).parent


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The hasten modules ``name`` imports anywhere in its source (a module, or the package it names)."""
    path, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                targets.add(sub if sub in MODULES else module)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_and_relative_imports():
    # function-level imports: metrics.reference calls generate() from inside a function
    assert "hasten.generate" in GRAPH["hasten.tune.ems"] and "hasten.generate" in GRAPH["hasten.metrics.reference"]
    assert "hasten.models.zoo" in GRAPH["hasten.quant.storage"]  # `from ..models.zoo import ...`
    assert "hasten.tune.ems" in GRAPH["hasten.tune"]  # `from . import ems`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    assert _cycles(GRAPH) == []


def test_models_import_nothing_from_quant():
    for name in (m for m in MODULES if m == "hasten.models" or m.startswith("hasten.models.")):
        assert not {t for t in GRAPH[name] if t.startswith("hasten.quant")}, name
        # nor by name through importlib
        literals = {n.value for n in ast.walk(ast.parse(MODULES[name][0].read_text())) if isinstance(n, ast.Constant)}
        assert not {v for v in literals if isinstance(v, str) and v.startswith(("hasten.quant", ".quant"))}, name


def test_generate_knows_no_solver_and_imports_no_tune():
    assert not {t for t in GRAPH["hasten.generate"] if t == "hasten.tune" or t.startswith("hasten.tune.")}
    tree = ast.parse(MODULES["hasten.generate"][0].read_text())
    names = set(hasten.available())
    named = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
    assert named == [], f"generate.py names solvers {named}; register an option resolver instead"


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_registrations_need_no_import_of_the_registrant():
    # Importing only the sampling entry point: v3's resolver (tune.ems) and the quantised-folder loader
    # (quant.storage) are registered by the package's own import.
    code = (
        "from hasten.generate import options_for_model; from hasten.solvers import OPTION_RESOLVERS; "
        "from hasten.models.zoo import FOLDER_FORMATS; "
        "print(sorted(OPTION_RESOLVERS.names()), FOLDER_FORMATS.names())"
    )
    assert _run(code) == "['dpm_solver_v3'] ['diffusers', 'ensemble', 'quantization', 'target_level']"


def test_quantised_folder_loads_through_the_zoo_alone(tiny_model, tmp_path):
    from hasten.quant import MIN_SAMPLES, QuantConfig, quantize_to_folder

    out = tmp_path / "q"
    quantize_to_folder(tiny_model, QuantConfig(weights=8, activations=None), out, n=MIN_SAMPLES, mode="single", steps=2)
    code = (
        "import sys; from hasten.models.zoo import load; "
        f"m = load({str(out)!r}); "
        "layers = [type(x).__name__ for x in m.network.modules() if type(x).__name__ == 'QuantizedLayer']; "
        "print(len(layers), m.info.weights_file, m.info.folder_format)"
    )
    count, weights_file, folder_format = _run(code).split()
    assert int(count) > 0 and weights_file == "quantized.safetensors" and folder_format == "quantization"


def test_an_unregistered_folder_format_is_refused_by_name(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    info = json.loads((folder / "hasten.json").read_text())
    (folder / "hasten.json").write_text(json.dumps({**info, "quantization": {"format": 1}}))
    monkeypatch.setattr(zoo.FOLDER_FORMATS, "_items", {"diffusers": zoo.FOLDER_FORMATS.get("diffusers")})
    with pytest.raises(ValueError, match=r"'quantization' record, but no loader .* \(registered: diffusers\)"):
        zoo.load(folder)


def test_schedule_defaults_come_from_the_solver():
    flow, vp = hasten.FlowMatching(), hasten.VPDiscrete.from_betas("linear")
    assert options_for_schedule("heun", flow, {}) == {"space": "flow"}
    assert options_for_schedule("plms", flow, {"warmup": "heun"}) == {"warmup": "heun", "space": "flow"}
    assert options_for_schedule("heun", flow, {"space": "ve"}) == {"space": "ve"}  # the caller's choice wins
    assert options_for_schedule("heun", vp, {}) == {} and options_for_schedule("dpmpp_2m", flow, {}) == {}
    assert options_for_schedule(get_solver("heun"), flow, {}) == {}  # a configured solver is left alone
    with pytest.raises(KeyError, match="unknown solver 'nope'"):
        options_for_schedule("nope", flow, {})


def test_v3_auto_statistics_resolve_through_the_registry(tiny_model, monkeypatch):
    import hasten.tune.ems as ems_module

    calls = []

    def fake_path(model, guidance):
        calls.append((model.fingerprint, guidance))
        return pathlib.Path("/cache/ems/abc.safetensors")

    monkeypatch.setattr(ems_module, "ems_path_for_model", fake_path)
    assert OPTION_RESOLVERS.get("dpm_solver_v3") is ems_module.resolve_auto_ems
    model = hasten.load(tiny_model)
    resolved = options_for_model("dpm_solver_v3", {"order": 3}, model, 2.0)
    assert resolved == {"order": 3, "ems": "/cache/ems/abc.safetensors"} and calls == [(model.fingerprint, 2.0)]
    assert options_for_model("dpm_solver_v3", {"ems": "degenerate"}, model, 2.0) == {"ems": "degenerate"}
    assert options_for_model("dpmpp_2m", {}, model, 2.0) == {} and len(calls) == 1
    # generate() hands the resolved path to the solver: here a missing file, so loading it fails by name
    with pytest.raises(FileNotFoundError, match=r"abc\.safetensors"):
        hasten.generate(model, 1, solver="dpm_solver_v3", steps=2)
    assert calls[-1] == (model.fingerprint, 1.0)
    assert torch.isfinite(hasten.generate(model, 1, solver="dpm_solver_v3", steps=2, ems="degenerate").images01).all()
