"""Experiment configuration: one TOML file declares a whole experiment.

.. code-block:: toml

    [model]                 # a registered model and its hyperparameters
    name = "vae"
    z_dim = 20
    hidden_dims = [400]

    [guide]                 # a guide registered for that model (or a generic one) and its hyperparameters
    name = "amortized"
    hidden_dims = [400]

    [data]
    name = "mnist"
    binarization = "dynamic"

    [train]
    elbo = "Trace_ELBO"
    optimizer = "adam"
    lr = 1e-3
    batch_size = 128
    num_epochs = 100

    [evaluate]
    num_samples = 5000

    [output]
    run_dir = "runs/vae_mnist"

Unknown sections or keys are errors that name the key and list the valid ones;
a value of the wrong type names the expected type; a value out of its range (``lr``
not a finite number > 0, ``max_steps`` < 1, ``keep_last`` < 0, ``evaluate.num_samples``
< 1, a ``split`` other than train/valid/test, an empty ``run_dir``, ...) is an error
when the file is read, before a run directory is touched or training starts.  ``[model]`` and ``[guide]``
keys other than ``name`` are the hyperparameters of the model's ``build`` and
the guide's ``build`` functions and are checked against their signatures.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from ppl_models.registry import UnknownNameError

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "GuideConfig",
    "DataConfig",
    "TrainConfig",
    "EvaluateConfig",
    "OutputConfig",
    "load_config",
    "parse_sections",
    "read_toml",
    "parse_override",
    "to_toml",
]


class ConfigError(ValueError):
    """A configuration that does not fit the schema; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "vae"
    hparams: Dict[str, Any] = field(default_factory=dict)


@dataclass
class GuideConfig:
    """``name`` unset: the guide the ``[train] strategy`` trains, else ``"amortized"``."""

    name: Optional[str] = None
    hparams: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """``name`` picks the loader (:data:`ppl_models.data.DATASETS`); the other keys are the
    loader's keyword arguments, plus ``limit_train`` / ``limit_valid`` / ``limit_test`` (use only the
    first rows of a split, for smoke tests)."""

    name: str = "mnist"
    hparams: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    strategy: Optional[str] = None  # svi-local, svi-inner, amortized, semi-amortized (ppl_models.infer.strategies)
    # The inner loop on λ of svi-inner and semi-amortized; unset: the strategy's measured default
    # (ppl_models.infer.strategies.INNER_LOOPS: svi-inner 10 plain steps α 1 → 0.1,
    # semi-amortized 10 plain steps α 0.02).
    inner_steps: Optional[int] = None  # K refinement steps on λ
    inner_lr: Optional[float] = None  # their step size α
    refine_grad: str = "stop"  # semi-amortized: "stop" or "end-to-end"
    inner_optimizer: Optional[str] = None  # the refinement's steps: "sgd" (the lecture's, clipped) or "adam"
    inner_lr_decay: Optional[float] = None  # the step size decays geometrically to inner_lr * inner_lr_decay
    local_lr: Optional[float] = None  # svi-local: Adam step size of the stored λ_i (unset: the measured 0.1)
    elbo: str = "Trace_ELBO"  # objective + gradient rule by name (ppl_models.infer.objectives), e.g. "IWAE"
    num_particles: int = 1
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 128
    num_epochs: int = 10
    max_steps: Optional[int] = None
    # stop when the training clock reaches this many seconds: from the first training step (set-up and compile not
    # counted), validation included, summed over --resume calls
    time_limit: Optional[float] = None
    # what time_limit counts: "wall" seconds, or "cpu": this process's CPU seconds (one CPU budget per run, however
    # busy the machine is; ppl_models.infer.schedules.BUDGET_CLOCKS)
    budget_clock: str = "wall"
    # the learning rate over the run (ppl_models.infer.schedules): "constant", "step" (Burda et al. 2016: 8 stages
    # of lengths ∝ 3^i, lr·ρ^(i/7)) or "cosine", over the run's steps or, with time_limit, its seconds; or "plateau":
    # halved at each validation not better than the best so far (Deng et al. 2018)
    lr_schedule: str = "constant"
    warmup: float = 0.0  # linear lr warm-up: 0 (none), a fraction of the run in (0, 1), or a whole number of steps
    lr_final: Optional[float] = None  # the lr at the end of a "step"/"cosine" schedule (unset: lr / 10)
    seed: int = 0
    keep_last: int = 2  # the run's newest checkpoints kept on disk (>= 1), or 0: keep all (ppl_models.infer.checkpoint)
    progress: bool = True
    validate: bool = True  # report the validation ELBO each epoch
    valid_subset: int = 2000  # validate on this many fixed rows of the validation split (0: all of them)
    valid_every: Optional[int] = None  # validate every this many steps (unset: at the end of each epoch)
    # stop after this many validations in a row not better than the best (0: never); the run then evaluates, and
    # `ppl-models evaluate` / `align` use, the parameters of the best validation (kept in every checkpoint)
    early_stopping: int = 0
    device: str = "cpu"  # "cpu", "cuda" (each process: the GPU of its local rank) or "cuda:K" (ppl_models.infer.distributed)
    # "auto" (the fast path wherever it applies, compiled when the run repays it), false, true/"eager" or "compile":
    # the captured ELBO (ppl_models.infer.fastpath); the run records which path ran (train.json)
    fast_path: object = "auto"
    # "auto" (one thread or all, whichever trains faster now: ppl_models.infer.threads) or a fixed number
    threads: object = "auto"

    def __post_init__(self):
        # A strategy's names are checked when the file is read, before a run directory is written.
        from ppl_models.infer.fastpath import fast_path_mode
        from ppl_models.infer.objectives import estimator_spec
        from ppl_models.infer.schedules import BUDGET_CLOCKS, make_lr_schedule
        from ppl_models.infer.strategies import INNER_OPTIMIZERS, REFINE_GRADS, STRATEGIES
        from ppl_models.infer.threads import check_threads

        try:  # one vocabulary with [compare] estimators: Pyro's ELBOs, IWAE and the package's estimators
            estimator_spec(self.elbo)
        except UnknownNameError as exc:
            raise ConfigError(f"[train] elbo: {exc}") from None
        for key, value, valid in (("strategy", self.strategy, STRATEGIES),
                                  ("refine_grad", self.refine_grad, REFINE_GRADS),
                                  ("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)):
            if value is not None and value not in valid:
                raise ConfigError(f"[train] {UnknownNameError(key.replace('_', ' '), value, valid)}")
        if self.budget_clock not in BUDGET_CLOCKS:
            raise ConfigError(f"[train] {UnknownNameError('budget_clock', self.budget_clock, BUDGET_CLOCKS)}")
        try:
            fast_path_mode(self.fast_path)
            check_threads(self.threads)
            make_lr_schedule(self.lr_schedule, warmup=self.warmup, lr=self.lr, lr_final=self.lr_final)
        except (ValueError, UnknownNameError) as exc:
            raise ConfigError(f"[train] {exc}") from None
        for key, value, least in (("valid_subset", self.valid_subset, 0), ("valid_every", self.valid_every, 1),
                                  ("early_stopping", self.early_stopping, 0)):
            if value is not None and value < least:
                raise ConfigError(f"[train] {key}: expected an integer >= {least}, received {value!r}")
        _check_numbers("train", self, _TRAIN_NUMBERS)


@dataclass
class EvaluateConfig:
    num_samples: int = 5000
    batch_size: int = 100
    split: str = "test"
    # svi-local / svi-inner: Adam steps fitting λ of each evaluated batch from the prior (unset: 300)
    refine_steps: Optional[int] = None
    # false, true/"eager", "compile" or "auto": each chunk's Pyro computation captured once (ppl_models.infer.evaluate);
    # not for svi-local / svi-inner, whose test-time guide runs an optimizer inside
    fast_path: object = False

    def __post_init__(self):
        from ppl_models.infer.fastpath import fast_path_mode

        try:
            fast_path_mode(self.fast_path)
        except ValueError as exc:
            raise ConfigError(f"[evaluate] {exc}") from None
        if self.split not in SPLITS:
            raise ConfigError(f"[evaluate] {UnknownNameError('split', self.split, SPLITS)}")
        _check_numbers("evaluate", self, _EVALUATE_NUMBERS)


@dataclass
class OutputConfig:
    run_dir: str = "runs/experiment"  # a directory that does not exist, is empty, or holds a run (its marker)
    plots: bool = True

    def __post_init__(self):
        if not self.run_dir.strip():
            raise ConfigError("[output] run_dir: expected a directory path, received an empty string "
                              "(it would be the current directory)")


#: The data splits a data set's loader returns (``evaluate.split`` is one of them).
SPLITS = ("train", "valid", "test")

# Numeric settings checked when a config is read, before a run directory is touched or training starts:
# key -> (kind, least); kind "int": an integer >= least; "float": a finite number > least.
_TRAIN_NUMBERS = {"lr": ("float", 0), "num_particles": ("int", 1), "batch_size": ("int", 1),
                  "num_epochs": ("int", 1), "max_steps": ("int", 1), "time_limit": ("float", 0),
                  "keep_last": ("int", 0)}  # keep_last: checkpoints kept (>= 1), or 0: keep all
_EVALUATE_NUMBERS = {"num_samples": ("int", 1), "batch_size": ("int", 1)}


def _check_numbers(section: str, values, rules: Mapping[str, Tuple[str, float]]) -> None:
    """One :class:`ConfigError` naming ``[section] key`` for the first value outside its range (``None``, an unset
    optional value, passes)."""
    for key, (kind, least) in rules.items():
        value = getattr(values, key)
        if value is None:
            continue
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
            want = "an integer >= 1 (checkpoints kept) or 0 (keep all)" if key == "keep_last" else f"an integer >= {least}"
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > least
            want = f"a finite number > {least}"
        if not ok:
            raise ConfigError(f"[{section}] {key}: expected {want}, received {value!r}")


_SECTIONS = {
    "model": ModelConfig,
    "guide": GuideConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "output": OutputConfig,
}
_FREE_FORM = ("model", "guide", "data")  # keys besides name are checked against a function's signature


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "Config":
        return cls(**parse_sections(raw, _SECTIONS, source, free_form=_FREE_FORM))

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            if name in _FREE_FORM:
                out[name] = {"name": section.name, **section.hparams} if section.name is not None else dict(section.hparams)
            else:
                out[name] = dataclasses.asdict(section)
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        """A copy with dotted keys replaced, e.g. ``{"train.lr": 3e-4}``."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if not key:
                raise ConfigError(f"override {dotted!r}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
            if section not in _SECTIONS:
                raise ConfigError(f"override {dotted!r}: {UnknownNameError('section', section, _SECTIONS)}")
            raw[section][key] = value
        return Config.from_dict(raw, source="overrides")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check_type(where: str, value, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {item.__name__}, received {type(value).__name__} {value!r}")
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(where, value, args[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{where}: expected {tp.__name__}, received bool {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, received {type(value).__name__} {value!r}")
        return value
    return value


def parse_sections(raw: Mapping[str, Any], sections: Mapping[str, type], source: str,
                   free_form: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """``{name: section}`` from a TOML table of tables: every section of ``sections`` (a dataclass each; a missing
    table gives its defaults), keys checked against the dataclass's fields and types.  A section in ``free_form``
    keeps its keys besides ``name`` as ``hparams``.  Anything else is one :class:`ConfigError` naming ``source``,
    the section and the key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, received {type(raw).__name__}")
    unknown = [k for k in raw if k not in sections]
    if unknown:
        raise ConfigError(f"{source}: {UnknownNameError('section', unknown[0], sections)}")
    out = {}
    for name, section_cls in sections.items():
        table = raw.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table, received {type(table).__name__}")
        out[name] = _build_section(name, section_cls, dict(table), source, name in free_form)
    return out


def _build_section(name: str, section_cls, table: Dict[str, Any], source: str, free_form: bool = False):
    if free_form:
        section_name = table.pop("name", section_cls().name)
        if section_name is not None and not isinstance(section_name, str):
            raise ConfigError(f"{source}: [{name}].name: expected str, received {type(section_name).__name__}")
        return section_cls(name=section_name, hparams=table)
    hints = typing.get_type_hints(section_cls)
    valid = [f.name for f in dataclasses.fields(section_cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(f"{source}: [{name}] {UnknownNameError('key', key, valid)}")
        kwargs[key] = _check_type(f"{source}: [{name}].{key}", value, hints[key])
    try:
        return section_cls(**kwargs)
    except ConfigError as exc:  # a section's own check (__post_init__)
        raise ConfigError(f"{source}: {exc}") from None


def read_toml(path: str | Path) -> dict:
    """The table of a TOML file (``tomllib``); a missing file or invalid TOML is one :class:`ConfigError`
    naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a TOML experiment file (``tomllib``), apply dotted-key ``overrides``, validate."""
    raw = read_toml(path)
    config = Config.from_dict(raw, source=str(path))
    return config.with_overrides(overrides) if overrides else config


def parse_override(text: str) -> tuple:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is read as TOML, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


def to_toml(config: Config) -> str:
    """The resolved configuration as TOML (``tomli_w``; ``None`` values, unset options, are omitted)."""
    import tomli_w

    tables = {section: {k: v for k, v in table.items() if v is not None} for section, table in config.to_dict().items()}
    return tomli_w.dumps(tables)
