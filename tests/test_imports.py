"""The light verbs stay light and the modules layer without cycles: `gradinv status`, `report`,
`export` and `--help` read Parquet and never load torch; no module of sweep/ or analysis/ imports
itself back through another, at the top or inside a function, and no module imports from a layer above
its own (LAYERS)."""

import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradinv.results.store import ResultsDir

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("gradinv", "analysis", "sweep")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Four finished one-image trials, written as `gradinv run` writes them; the last has a trained victim
    (the report's accuracy table reads the dataset's class count)."""
    path = tmp_path_factory.mktemp("light") / "results"
    rng = np.random.default_rng(0)
    rows = []
    for image in range(4):
        truth = rng.random((8, 8))
        rows.append(
            {
                "study": "light",
                "key": f"{image:020d}",
                "dataset": "faces",
                "images": [image],
                "images_per_client": 1,
                "model": "convnet",
                "width": 2,
                "attack": "ig",
                "iterations": 8,
                "status": "ok",
                "psnr": 20.0 + image,
                "psnr_per_image": [20.0 + image],
                "ssim": 0.5,
                "label_accuracy": 1.0,
                "baseline_psnr": 15.0,
                "psnr_gain": 5.0 + image,
                "truth_png": [png(truth)],
                "reconstruction_png": [png(truth[::-1])],
                "trained_epochs": 2 if image == 3 else 0,
                "model_accuracy": 0.9 if image == 3 else None,
            }
        )
    with ResultsDir(path) as written:
        written.write(rows)
    return path


def run_fresh(code: str) -> dict:
    """``code`` in a fresh interpreter of this venv; what it printed last, as JSON."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("verb", ["status", "report", "export", "--help"])
def test_light_verbs_do_not_import_torch(verb, results, tmp_path):
    argv = {
        "status": ["status", str(results)],
        "report": ["report", str(results), "--out", str(tmp_path / "report.html")],
        "export": ["export", str(results), "--to", str(tmp_path / "export")],
        "--help": ["--help"],
    }[verb]
    code = (
        "import contextlib, io, json, sys\n"
        "from sweep.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        exit_code = main({argv!r})\n"
        "    except SystemExit as stop:\n"
        "        exit_code = stop.code\n"
        "print(json.dumps({'exit': exit_code, 'torch': 'torch' in sys.modules}))\n"
    )
    outcome = run_fresh(code)
    assert outcome == {"exit": 0, "torch": False}
    if verb == "report":
        assert (tmp_path / "report.html").stat().st_size > 0
    if verb == "export":
        assert len(list((tmp_path / "export").rglob("*.png"))) == 8  # 4 reconstructions and their truths


# The layers, lowest first: a module imports only from its own layer or those below it.
LAYERS = ("gradinv", "gradinv.results", "analysis", "sweep", "sweep.cli")


def module_imports(path: Path, name: str) -> set[str]:
    """The modules ``name`` (at ``path``) imports, anywhere in its body (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import tuning`
    return found


def import_graph() -> dict[str, set[str]]:
    """Every module of the three packages -> the modules of the three packages it imports."""
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: (module_imports(path, name) & set(modules)) - {name} for name, path in modules.items()}


def layer(module: str) -> int:
    """The index in LAYERS of the deepest layer holding ``module``."""
    if module == "sweep.__main__":  # `python -m sweep`: the command line's entry point
        return LAYERS.index("sweep.cli")
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it, or None."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return trail[trail.index(target) :] + [module, target] if target in trail else [module, target]
            if target not in state:
                cycle = visit(target, trail + [module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            if cycle:
                return cycle
    return None


def test_the_whole_tree_has_no_import_cycle():
    graph = import_graph()
    assert "sweep.cli.tune" in graph["sweep.cli.main"] and "gradinv.results.store" in graph["analysis.load"]  # seen
    assert "gradinv.client.dp_training" in graph["gradinv.zoo_training"]  # imports inside functions are seen too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_declarations_and_the_dp_step_import_nothing_that_imports_them():
    graph = import_graph()  # the registry and the models read the declarations; the client update runs DP-SGD
    assert not graph["gradinv.parameters"] & {"gradinv.attacks.registry", "gradinv.models"}
    assert "gradinv.client.update" not in graph["gradinv.client.dp_training"]
    assert "gradinv.client.dp_training" in graph["gradinv.client.update"]


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if layer(target) > layer(source)
    )
    assert not upward, upward


def test_the_layer_check_sees_an_upward_import():
    assert layer("gradinv.zoo") < layer("gradinv.results.store") < layer("analysis.load") < layer("sweep.runner")
    assert layer("sweep.runner") < layer("sweep.cli.main")


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
