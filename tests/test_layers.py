"""The package map as a test: every import in fmlab (module-level or inside a function) goes down the layer order,
never up, and the edges the design rules out are absent. A formula or loop has one home."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.test_package import imported_modules

PACKAGE = REPO_ROOT / "src" / "fmlab"
# bottom up: an import only goes to its own layer or one below
LAYERS = [
    {
        "fmlab",
        "fmlab.errors",
        "fmlab.seeding",
        "fmlab.io",
        "fmlab.distributed",
        "fmlab.plotting",
        "fmlab.optim",
        "fmlab.conditioning",
    },
    {"fmlab.paths", "fmlab.couplings", "fmlab.nets", "fmlab.metrics"},
    {"fmlab.objectives"},
    {"fmlab.samplers"},
    {"fmlab.likelihood"},
    {"fmlab.data"},
    {"fmlab.reflow"},
    {"fmlab.evaluation"},
    {"fmlab.module"},
    {"fmlab.runs"},
    {"fmlab.callbacks", "fmlab.loggers"},
    {"fmlab.cli", "fmlab.results", "fmlab.launch"},
    {"fmlab.build"},
    {"fmlab.train", "fmlab.evaluate", "fmlab.table"},
]
# edges the layer order alone would allow but the design rules out
FORBIDDEN = {("fmlab.module", "fmlab.samplers"), ("fmlab.data", "fmlab.samplers"), ("fmlab.reflow", "fmlab.runs")}


def unit(module: str) -> str:
    """The layer unit a module belongs to: its package (fmlab.samplers.ode → fmlab.samplers) or itself."""
    parts = module.split(".")
    if len(parts) > 1 and not ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return "fmlab"  # a name the package itself defines (fmlab.__version__)
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer_of(module: str) -> int:
    name = unit(module)
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"{module} is in no layer of the package map; add it to LAYERS")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fmlab_imports(path: Path) -> set[str]:
    """Every fmlab module `path` imports, at any depth of its code (lazy imports inside functions included)."""
    return {n for n in imported_modules(path) if n == "fmlab" or n.startswith("fmlab.")}


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts)


def test_every_import_goes_down_the_layer_order() -> None:
    upward = []
    for path in sources():
        importer = module_name(path)
        for imported in fmlab_imports(path):
            if unit(imported) == unit(importer):
                continue
            if layer_of(imported) > layer_of(importer) or (unit(importer), unit(imported)) in FORBIDDEN:
                upward.append(f"{importer} -> {imported}")
    assert upward == []


def test_the_layer_test_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a data module importing the runs layer is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from fmlab.runs import load_run\n")
    assert layer_of(next(iter(fmlab_imports(probe)))) > layer_of("fmlab.data.toy2d")


def occurrences(pattern: str) -> dict[str, int]:
    found = {}
    for path in sources():
        count = len(re.findall(pattern, path.read_text()))
        if count:
            found[str(path.relative_to(PACKAGE))] = count
    return found


def test_each_formula_and_loop_has_one_home() -> None:
    # the one bisection (t of a noise level; the mode sampler's inverse calls it too)
    assert occurrences(r"for _ in range\(60\)") == {"paths/path.py": 1}
    # the one fixed-grid loop
    assert occurrences(r"for i in range\(num_steps\)|for i in range\(self\.num_steps\)") == {"samplers/base.py": 1}
    # the prior's Gaussian log-density and the DDPM transition coefficients live on the path
    assert occurrences(r"log\(2 \* math\.pi\)") == {"paths/path.py": 2}
    assert set(occurrences(r"\*\* 2 - a\*\*2 \*")) == {"paths/path.py"}
    # no hidden sampler list: the registry is the one map of sampler names
    assert set(occurrences(r"STOCHASTIC_SOLVERS")) == set()
    # one CSV writer outside the loggers' own
    assert set(occurrences(r"csv\.(DictWriter|writer)\(")) <= {"io.py", "loggers.py"}
