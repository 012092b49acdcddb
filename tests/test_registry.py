"""Where the registry's models and guides come from: a scan of the package finds every built-in model and
guide (read here from the files on disk), a third-party distribution registers its model through the
entry-point group ``ppl_models.models`` like a built-in one, a broken entry point raises one clear error, and
guides registered for a kind of model apply to each model of that kind."""

import ast
import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_models import registry
from ppl_models.registry import ModelParts, UnknownNameError
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite

ROOT = Path(__file__).resolve().parents[1]


def _registrations_on_disk():
    """(models, guides, registering modules) from the module-level ``register_model("name", ...)`` and
    ``register_guide("name", model="m", ...)`` calls in ppl_models/*.py and guides/*.py."""
    models, guides, modules = set(), set(), set()
    files = [("ppl_models", p) for p in sorted((ROOT / "ppl_models").glob("*.py"))]
    files += [("ppl_models.guides", p) for p in sorted((ROOT / "guides").glob("*.py")) if p.stem != "__init__"]
    for package, path in files:
        for node in ast.parse(path.read_text()).body:
            call = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
                continue
            if call.func.id not in ("register_model", "register_guide"):
                continue
            modules.add(f"{package}.{path.stem}")
            name = call.args[0].value
            if call.func.id == "register_model":
                models.add(name)
            else:
                model = [k.value.value for k in call.keywords if k.arg == "model"]
                guides.add((model[0] if model else None, name))  # None: registered for a kind of model
    return models, guides, modules


def test_the_scan_finds_every_built_in_model_and_guide_in_a_fresh_interpreter():
    code = textwrap.dedent("""
        import json, sys
        from ppl_models import registry
        models = registry.model_names()
        print(json.dumps({"modules": registry.builtin_modules(), "models": models,
                          "guides": {m: registry.guide_names(m) for m in models},
                          "loaded": sorted(m for m in sys.modules if m.startswith("ppl_models"))}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    models, guides, modules = _registrations_on_disk()
    assert models and guides
    assert models <= set(found["models"]), f"models on disk but not registered: {sorted(models - set(found['models']))}"
    for model, name in guides:
        if model is None:  # registered for a kind of model (declared models): see the kind test below
            continue
        for owner in found["models"] if model == "*" else [model]:
            assert name in found["guides"][owner], f"guide {name!r} of {owner!r} not registered"
    assert modules <= set(found["modules"]) <= set(found["loaded"])
    # Every guide module is scanned (a new file is picked up with no list to edit), in sorted order.
    on_disk = sorted(p.stem for p in (ROOT / "guides").glob("*.py") if p.stem != "__init__")
    scanned_guides = [m.rpartition(".")[2] for m in found["modules"] if m.startswith("ppl_models.guides.")]
    assert scanned_guides == on_disk
    scanned_models = [m for m in found["modules"] if not m.startswith("ppl_models.guides.")]
    assert scanned_models == sorted(scanned_models)
    core = {"__init__", "__main__", "spec", "registry", "distributions", "families", "atomic"}
    assert not {m.rpartition(".")[2] for m in scanned_models} & core


# ------------------------------------------------------------------------------- a third-party distribution
PLUGIN = '''
"""A third-party model: for each datapoint i, (1) z_i ~ N(0, 1); (2) x_i | z_i ~ N(w z_i + b, 1); x_i of shape (1,)."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_models.registry import ModelParts, register_guide, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, data_plate


def model(x, idx=None, *, decoder, num_data=None):
    pyro.module("decoder", decoder)
    with data_plate(x, idx, num_data, "data"):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)


def guide(x, idx=None, *, encoder, num_data=None):
    pyro.module("encoder", encoder)
    with data_plate(x, idx, num_data, "data"):
        z_loc, z_log_scale = encoder(x).chunk(2, dim=-1)
        pyro.sample("z", dist.Normal(z_loc, z_log_scale.exp()).to_event(1))


def build():
    spec = ModelSpec("tiny-plugin", ObservedSite("x", (1,)), "data", (LatentSite("z", (1,)),))
    return ModelParts(spec, {"decoder": nn.Linear(1, 1)})


def build_guide(spec, num_data=None):
    return {"encoder": nn.Linear(1, 2)}


register_model("tiny-plugin", model=model, build=build)
register_guide("linear-encoder", model="tiny-plugin", guide=guide, build=build_guide)
'''


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as after the built-in scan, with entry points to be read again; restored afterwards."""
    registry.model_names()
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_GUIDES", dict(registry._GUIDES))
    monkeypatch.setattr(registry, "_LOADED", False)
    added = []
    yield added
    for name in added:
        sys.modules.pop(name, None)


def install_distribution(tmp_path, monkeypatch, dist_name, entry_points, modules=None):
    """A distribution ``dist_name`` on ``sys.path``: its modules and a dist-info with ``entry_points.txt``."""
    site = tmp_path / "site"
    info = site / f"{dist_name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    lines = [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("[ppl_models.models]\n" + "\n".join(lines) + "\n")
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))


def test_a_model_of_an_installed_distribution_registers_through_its_entry_point(tmp_path, monkeypatch, fresh_registry):
    module = f"tiny_plugin_{uuid.uuid4().hex[:8]}"
    fresh_registry.append(module)
    install_distribution(tmp_path, monkeypatch, "tiny-plugin", {"tiny": module}, {module: PLUGIN})
    assert module not in sys.modules

    entry = registry.get_model("tiny-plugin")
    assert module in sys.modules and entry.model.__module__ == module
    assert "tiny-plugin" in registry.model_names() and "vae" in registry.model_names()
    # Its own guide and the generic ones, like a built-in model.
    assert {"linear-encoder", "mean-field", "amortized-mlp"} <= set(registry.guide_names("tiny-plugin"))

    pyro.clear_param_store()
    torch.manual_seed(0)
    x = 3.0 + torch.randn(64, 1)
    for guide_name, guide_kwargs in (("linear-encoder", {}), ("amortized-mlp", {"hidden_dims": [8]})):
        inst = registry.instantiate("tiny-plugin", guide_name, num_data=64, guide_kwargs=guide_kwargs)
        assert inst.spec.local_latents == (LatentSite("z", (1,)),) and "decoder" in inst.modules
        trace = pyro.poutine.trace(inst.guide).get_trace(x, torch.arange(64), num_data=64)
        assert trace.nodes["z"]["value"].shape == (64, 1)
        svi = pyro.infer.SVI(inst.model, inst.guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
        losses = [svi.step(x, torch.arange(64), num_data=64) for _ in range(100)]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-10:]) < sum(losses[:10])  # the decoder's bias moves toward the data's mean 3
        pyro.clear_param_store()


@pytest.mark.parametrize("broken", ["missing module", "error on import"])
def test_a_broken_entry_point_raises_one_error_naming_it_and_its_distribution(tmp_path, monkeypatch, fresh_registry,
                                                                              broken):
    module = f"broken_plugin_{uuid.uuid4().hex[:8]}"
    fresh_registry.append(module)
    sources = {} if broken == "missing module" else {module: "raise RuntimeError('no GPU found')\n"}
    install_distribution(tmp_path, monkeypatch, "broken-plugin", {"bad": module}, sources)
    for _ in range(2):  # not swallowed: every lookup reports it until it is fixed
        with pytest.raises(ImportError) as info:
            registry.get_model("vae")
        message = str(info.value)
        assert "'bad'" in message and module in message and "'broken-plugin'" in message
        assert "ppl_models.models" in message
        expected = "ModuleNotFoundError" if broken == "missing module" else "RuntimeError: no GPU found"
        assert expected in message


# ------------------------------------------------------------------------------------------------ kinds
def _tiny(kind=""):
    spec = ModelSpec("k", ObservedSite("x", (1,)), "data", (LatentSite("z", (1,)),))

    def model(x, idx=None, *, num_data=None):
        pass

    return dict(model=model, build=lambda: ModelParts(spec), kind=kind)


def _guide():
    def guide(x, idx=None, *, num_data=None):
        pass

    return dict(guide=guide, build=lambda spec, num_data=None: {})


def test_a_guide_for_a_kind_applies_to_each_model_of_that_kind_and_a_models_own_guide_wins(fresh_registry):
    registry.register_model("kind-a", **_tiny("test-kind"))
    registry.register_model("kind-b", **_tiny("test-kind"))
    registry.register_model("no-kind", **_tiny())
    g_kind, g_own, g_all = _guide(), _guide(), _guide()
    registry.register_guide("shared", kind="test-kind", **g_kind)
    registry.register_guide("shared", model="kind-b", **g_own)
    registry.register_guide("everywhere-test", model="*", **g_all)
    assert registry.get_guide("kind-a", "shared").guide is g_kind["guide"]
    assert registry.get_guide("kind-b", "shared").guide is g_own["guide"]
    assert registry.get_guide("kind-a", "everywhere-test").guide is g_all["guide"]
    assert "shared" in registry.guide_names("kind-a") and "shared" not in registry.guide_names("no-kind")
    with pytest.raises(UnknownNameError, match="guide for model 'no-kind'.*'shared'"):
        registry.get_guide("no-kind", "shared")
    with pytest.raises(ValueError, match="exactly one of model= .* and kind="):
        registry.register_guide("both", model="kind-a", kind="test-kind", **g_kind)
    with pytest.raises(ValueError, match="exactly one of model="):
        registry.register_guide("neither", **g_kind)
