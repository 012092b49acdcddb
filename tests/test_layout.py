"""The package's layers, read from the source: each layer imports only the layers below it.

    core    ppl_models (its __init__), spec, registry, distributions, encodings, families, atomic
    data    ppl_models.data.*                               -> core
    models  ppl_models.<story>.py, one per generative story -> core, models
    guides  ppl_models.guides.* (the top-level guides/ folder) -> core, models, guides
    infer   ppl_models.infer.*                              -> core, data, infer
    tasks   ppl_models.tasks.*                              -> core, data, models, guides, infer, tasks
    app     ppl_models.app.*, ppl_models.compare.*, __main__ -> everything

Imports inside functions count as much as those at the top of a module: a deferred import is still a
dependency.  Registration (a model's ``register_model``, a guide's ``register_guide``) happens only in the
model and guide modules that the registry's scan imports, never as a side effect of importing anything else.
"""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {"ppl_models", "ppl_models.spec", "ppl_models.registry", "ppl_models.distributions",
        "ppl_models.encodings", "ppl_models.families", "ppl_models.atomic", "ppl_models.runtime"}
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "models": {"core", "models"},
    "guides": {"core", "models", "guides"},
    "infer": {"core", "data", "infer"},
    "tasks": {"core", "data", "models", "guides", "infer", "tasks"},
    "app": {"core", "data", "models", "guides", "infer", "tasks", "app"},
}
MAX_LINES = 600


def _modules():
    """(dotted name, path) of every module of the installed package, guides/ under ppl_models.guides."""
    out = []
    for folder, prefix in ((ROOT / "ppl_models", "ppl_models"), (ROOT / "guides", "ppl_models.guides")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join([prefix, *parts]), path))
    return out


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    parts = module.split(".")
    sub = parts[1]
    if sub == "guides":
        return "guides"
    if sub in ("data", "infer", "tasks"):
        return sub
    if sub in ("app", "compare", "__main__"):
        return "app"
    if len(parts) == 2:
        return "models"
    raise AssertionError(f"{module}: not in any layer; add its package to the layer table")


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(module: str, path: Path):
    """Every ``ppl_models`` module that ``module`` imports (resolved; ``from a import b`` counts ``a.b``
    when ``a.b`` is a module), with the line."""
    known = {name for name, _ in _modules()}
    package = module if _is_package(path) else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
        else:
            continue
        for name in names:
            if name == "ppl_models" or name.startswith("ppl_models."):
                while name not in known:  # an attribute of a module: the module is the dependency
                    name = name.rpartition(".")[0]
                yield name, node.lineno


def test_every_module_has_a_layer():
    for module, _ in _modules():
        assert layer(module) in ALLOWED


def test_each_layer_imports_only_the_layers_below_it():
    broken = []
    for module, path in _modules():
        mine = layer(module)
        for target, line in imports_of(module, path):
            theirs = layer(target)
            if theirs not in ALLOWED[mine]:
                broken.append(f"{path.relative_to(ROOT)}:{line}: {mine} module {module} imports {theirs} module {target}")
    assert not broken, "imports against the layering:\n" + "\n".join(broken)


def test_the_layer_check_sees_deferred_and_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from ppl_models.app import config\n    from ..infer import engine\n")
    found = {name for name, _ in imports_of("ppl_models.data.m", path)}
    assert found == {"ppl_models.app", "ppl_models.app.config", "ppl_models.infer", "ppl_models.infer.engine"}


def _module_level_calls(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            yield node.value
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            yield node.value


def _call_name(call: ast.Call) -> str:
    func = call.func
    while isinstance(func, ast.Call):  # register(...)(...)
        func = func.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_registration_happens_only_in_model_and_guide_modules():
    offenders = []
    for module, path in _modules():
        allowed = {"register_model", "register_guide"} if layer(module) in ("models", "guides") else set()
        tree = ast.parse(path.read_text())
        for call in _module_level_calls(tree):
            name = _call_name(call)
            if re.match(r"_?register", name) and name not in allowed:
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: {name}(...) at import time")
    assert not offenders, "\n".join(offenders)


def test_no_module_is_longer_than_600_lines_without_a_stated_reason():
    long = []
    for module, path in _modules():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if not re.search(r"over 600 lines because", doc):
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, "modules over 600 lines whose docstring gives no reason ('over 600 lines because ...'):\n" + "\n".join(long)


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {module for module, path in _modules() if _is_package(path)}
    assert listed == found


@pytest.mark.parametrize("module", ["ppl_models", "ppl_models.data", "ppl_models.infer", "ppl_models.tasks"])
def test_layers_below_the_app_import_no_app_module_at_run_time(module):
    """The same boundary at run time, in a fresh interpreter: importing a lower layer loads no app module."""
    import subprocess
    import sys

    code = (f"import sys, {module}\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('ppl_models.app', 'ppl_models.compare')))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_registry_scan_skips_exactly_the_core_modules():
    """The registry imports every top-level module that is not core as a model module: its list of
    non-model modules and this test's core layer must name the same files."""
    from ppl_models import registry

    core_files = {name.rpartition(".")[2] for name in CORE if name != "ppl_models"}
    assert set(registry._NOT_MODEL_MODULES) - {"__init__", "__main__", "declarative"} == core_files


def test_importing_the_package_loads_no_torch():
    """``import ppl_models`` is cheap: the CLI answers ``--help`` without loading torch."""
    import subprocess
    import sys

    code = "import sys, ppl_models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_help_loads_no_torch():
    """``ppl-models --help`` answers before torch is imported (it took 10.9 s when it imported torch and Pyro
    first; 0.09 s now): checked by what it imports, not by timing it."""
    import subprocess
    import sys

    code = ("import sys\nfrom ppl_models.app import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'pyro' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
