r"""Pyro's computation captured once as a pure tensor function of (parameters, batch, noise), verified, and run.

The capture behind the engine's fast path (:mod:`ppl_models.infer.fastpath`, training) and the evaluator's
captured terms (:class:`~ppl_models.infer.fastpath.CapturedTerms`):

1. **Capture.** ``make_fx`` (real tensors) records the aten operations of a Pyro computation — for training,
   the objective itself: the guide and the model replayed on its draws (``elbo._get_traces``) and the
   surrogate loss of ``elbo._differentiable_loss_particle`` (Pyro's ``Trace_ELBO``, ``TraceMeanField_ELBO``) or
   :meth:`~ppl_models.infer.objectives.IWAE_ELBO.surrogate_loss` (:func:`capture_loss`), so plates, scales,
   masks, analytic KLs and particle averaging are the objective's own; an
   :class:`~ppl_models.infer.objectives.EstimatorELBO` is captured as the ELBO inside it on the guide as its
   rule runs it (``reparameterized``, ``analytic-kl``, ``sticking-the-landing``); for evaluation, any function
   of the batch (:func:`capture_function`).
2. **Rewrite** the recorded graph into ``out = f(parameters, batch, noise)``: tensors of the Pyro param store
   become inputs (the live tensors the optimizer updates), every random draw moves to a separate *noise*
   graph run eagerly before ``f`` with torch's global generator (the same draws, in the same order, as
   Pyro's eager run), and scalar reads (``.item()`` of input checks) are dropped.
3. **Verify.** :class:`CapturedPrograms` captures again on the first other batch; the two programs must be
   identical — operations, constants and parameters — or the structure depends on values and the caller
   falls back to Pyro (:class:`FastPathUnsupported`, with the reason).
4. **Run** each program with its runner (the captured graph, or a compiled one), per key (batch shape).

Private APIs: ``make_fx(..., _error_on_data_dependent_ops=False)`` and Pyro's ``ELBO._get_traces`` /
``_differentiable_loss_particle`` (torch 2.13, pyro 1.9.2).  If a later version changes them the capture
fails, and the caller says so in its notice and runs Pyro.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import fx

from ppl_models.infer.objectives import IWAE_ELBO, EstimatorELBO

__all__ = [
    "SUPPORTED_ELBOS",
    "FastPathUnsupported",
    "CapturedLoss",
    "CapturedPrograms",
    "capture_function",
    "capture_loss",
    "unsupported_objective",
    "with_tensors",
]

aten = torch.ops.aten

#: The objectives :func:`capture_loss` captures (also inside an :class:`~ppl_models.infer.objectives.EstimatorELBO`).
SUPPORTED_ELBOS = (Trace_ELBO, TraceMeanField_ELBO, IWAE_ELBO)


class FastPathUnsupported(RuntimeError):
    """The model, guide or objective is outside what the fast path captures; the message says why."""


@dataclass
class CapturedLoss:
    """``loss = graph(*params, *tensors, *noise_graph())``: the captured surrogate loss (see module docstring).

    :param graph: the loss graph; inputs: parameters, then the batch's tensors, then the noise.
    :param noise_graph: no inputs; returns the tuple of noise tensors, drawn as Pyro draws them.
    :param param_names: param-store names of the parameter inputs, in order.
    :param params: the live parameter tensors, in order.
    :param signature: what two captures must share to be the same program.
    :param sparse: whether some parameter gets a sparse gradient (``embedding(sparse=True)``).
    """

    graph: fx.GraphModule
    noise_graph: fx.GraphModule
    param_names: List[str]
    params: List[torch.Tensor]
    signature: tuple
    sparse: bool
    constants: List[torch.Tensor] = field(default_factory=list)

    def same_program(self, other: "CapturedLoss") -> bool:
        if self.signature != other.signature or len(self.constants) != len(other.constants):
            return False
        return all(a.shape == b.shape and bool(torch.equal(a, b)) for a, b in zip(self.constants, other.constants))

    def __call__(self, tensors, noise=None) -> torch.Tensor:
        noise = self.noise_graph() if noise is None else noise
        return self.graph(*self.params, *tensors, *noise)


def _check_structure(model_trace, guide_trace) -> None:
    """Raise :class:`FastPathUnsupported` for sites the captured graph would not handle like Pyro."""
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if site["infer"].get("enumerate"):
            raise FastPathUnsupported(f"guide site {name!r} is enumerated")
        if not getattr(site["fn"], "has_rsample", False):
            raise FastPathUnsupported(
                f"guide site {name!r} ({type(site['fn']).__name__}) is not reparameterizable "
                "(score-function gradients)"
            )
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            if name not in guide_trace.nodes:
                raise FastPathUnsupported(f"model latent site {name!r} has no guide site")
            if site["infer"].get("enumerate"):
                raise FastPathUnsupported(f"model site {name!r} is enumerated")


def with_tensors(template: tuple, tensors) -> tuple:
    """``template`` (tensors and other values) with its tensors replaced, in order, by ``tensors``."""
    args, it = list(template), iter(tensors)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            args[i] = next(it)
    return tuple(args)


def unsupported_objective(elbo) -> Optional[str]:
    """Why :func:`capture_loss` cannot capture the objective ``elbo`` (``None``: it can)."""
    inner = elbo.inner if isinstance(elbo, EstimatorELBO) else elbo
    if inner is None:
        return f"estimator {elbo.spec.name!r} has not run yet"
    if type(inner) in SUPPORTED_ELBOS:
        return None
    name = type(inner).__name__
    if isinstance(elbo, EstimatorELBO):
        name = f"{name} (estimator {elbo.spec.name!r})"
    return f"objective {name} (supported: Trace_ELBO, TraceMeanField_ELBO, IWAE, and the estimators on them)"


def _loss_function(elbo, model, guide, template: tuple, kwargs: dict):
    """``f(*tensors) -> surrogate loss``: the objective for the arguments ``template`` with its tensors replaced."""
    if isinstance(elbo, EstimatorELBO):  # the ELBO inside it, on the guide as its rule runs it
        elbo, guide = elbo.inner, elbo.guide_for(guide)

    def loss(*tensors):
        args = with_tensors(template, tensors)
        total = 0.0
        with pyro.validation_enabled(False):
            traces = []
            for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
                _check_structure(model_trace, guide_trace)
                traces.append((model_trace, guide_trace))
            if isinstance(elbo, IWAE_ELBO):  # the particles enter one log-sum-exp per datapoint
                total = elbo.surrogate_loss(traces)
            else:
                for model_trace, guide_trace in traces:
                    _, surrogate = elbo._differentiable_loss_particle(model_trace, guide_trace)
                    total = total + surrogate / elbo.num_particles
        if not isinstance(total, torch.Tensor):
            raise FastPathUnsupported("the objective does not depend on any tensor")
        return total

    return loss


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _ancestors(node: fx.Node) -> List[fx.Node]:
    seen, stack, out = set(), [node], []
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                out.append(a)
                stack.append(a)
    return out


def capture_loss(elbo, model, guide, args: tuple, kwargs: dict) -> CapturedLoss:
    """Capture Pyro's ``elbo`` for ``model``/``guide`` on ``args`` (tensors and ``None``) as a :class:`CapturedLoss`.

    Runs guide and model once (the generators' state is restored afterwards, so the caller's next draw
    is the one Pyro would make).  Raises :class:`FastPathUnsupported` with the reason.
    """
    reason = unsupported_objective(elbo)
    if reason is not None:
        raise FastPathUnsupported(reason)
    return capture_function(_loss_function(elbo, model, guide, tuple(args), kwargs), args)


def _tensors_of(args: tuple) -> List[torch.Tensor]:
    for a in args:
        if a is not None and not isinstance(a, torch.Tensor):
            raise FastPathUnsupported(f"argument of type {type(a).__name__} (only tensors and None)")
    return [a for a in args if isinstance(a, torch.Tensor)]


def capture_function(fn: Callable, args: tuple) -> CapturedLoss:
    """Capture ``fn(*tensors)``, a Pyro computation on the tensors of ``args`` (tensors and ``None``) that
    returns tensors, as a :class:`CapturedLoss` (its graph returns what ``fn`` returns).  The generators'
    state is restored afterwards.  Raises :class:`FastPathUnsupported` with the reason."""
    from torch.fx.experimental.proxy_tensor import make_fx

    tensors = _tensors_of(args)
    store = pyro.get_param_store()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gm = make_fx(fn, tracing_mode="real", _error_on_data_dependent_ops=False)(*tensors)
        except FastPathUnsupported:
            raise
        except Exception as exc:  # anything make_fx cannot record
            raise FastPathUnsupported(f"capture failed: {_first_line(exc)}") from exc
    param_by_id = {id(t): name for name, t in store._params.items()}
    try:
        return _rewrite(gm, len(tensors), param_by_id, store)
    except FastPathUnsupported:
        raise
    except Exception as exc:  # a graph the rewrite does not understand
        raise FastPathUnsupported(f"rewriting the captured graph failed: {_first_line(exc)}") from exc


def _rewrite(gm: fx.GraphModule, num_inputs: int, param_by_id: Dict[int, str], store) -> CapturedLoss:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != num_inputs:
        raise FastPathUnsupported("captured graph has an unexpected signature")
    # 1. scalar reads feed no tensor of the graph: drop them
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten._local_scalar_dense.default:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    # 2. parameters of the param store become the first inputs
    param_nodes: Dict[str, fx.Node] = {}
    param_names: List[str] = []
    constants: List[torch.Tensor] = []
    const_nodes: List[str] = []
    first = placeholders[0] if placeholders else next(iter(graph.nodes))
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = getattr(gm, node.target)
        name = param_by_id.get(id(value)) if isinstance(value, torch.Tensor) else None
        if name is None:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                raise FastPathUnsupported(
                    f"a tensor that requires grad is not a Pyro parameter ({tuple(value.shape)}); "
                    "register it with pyro.param or pyro.module"
                )
            const_nodes.append(node.target)
            constants.append(value.detach() if isinstance(value, torch.Tensor) else value)
            continue
        if name not in param_nodes:
            with graph.inserting_before(first):
                param_nodes[name] = graph.placeholder(f"param_{len(param_names)}")
            param_names.append(name)
        node.replace_all_uses_with(param_nodes[name])
        graph.erase_node(node)
    # 3. random draws move to the noise graph
    random_nodes = [
        n for n in graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in n.target.tags
    ]
    noise_graph = fx.Graph()
    copied: Dict[fx.Node, fx.Node] = {}
    noise_outputs = []
    last_input = placeholders[-1] if placeholders else None
    for k, node in enumerate(random_nodes):
        ancestors = _ancestors(node)
        if any(a.op == "placeholder" for a in ancestors):
            raise FastPathUnsupported(
                f"random draw {node.target} depends on the batch or the parameters "
                "(a sampler without a fixed-noise reparameterization)"
            )
        members = set(ancestors) | {node}
        for a in ancestors:
            if any(u not in members and u not in random_nodes for u in a.users):
                raise FastPathUnsupported(f"the buffer of random draw {node.target} is used elsewhere")
        for n in graph.nodes:  # topological order
            if n in members and n not in copied:
                if n.op == "get_attr":
                    raise FastPathUnsupported(f"random draw {node.target} reads a stored tensor")
                copied[n] = noise_graph.node_copy(n, lambda a: copied[a])
        noise_outputs.append(copied[node])
        with graph.inserting_after(last_input) if last_input is not None else graph.inserting_before(first):
            ph = graph.placeholder(f"noise_{k}")
        last_input = ph
        node.replace_all_uses_with(ph)
    for node in reversed(random_nodes):
        graph.erase_node(node)
    graph.eliminate_dead_code()
    noise_graph.output(tuple(noise_outputs))
    # drop the attributes that became inputs or vanished
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for name in list(dict(gm.named_parameters()).keys()) + list(dict(gm.named_buffers()).keys()):
        if name not in used and "." not in name:
            delattr(gm, name)
    for name in list(vars(gm)):
        if name.startswith("_tensor_constant") and name not in used:
            delattr(gm, name)
    graph.lint()
    gm.recompile()
    noise_gm = fx.GraphModule(torch.nn.Module(), noise_graph)
    sparse = any(
        n.op == "call_function" and n.target is aten.embedding.default and len(n.args) > 4 and n.args[4]
        for n in graph.nodes
    )
    params = [store._params[name] for name in param_names]
    kept = [(t, v) for t, v in zip(const_nodes, constants) if t in used]
    signature = (
        gm.code,
        noise_gm.code,
        tuple(param_names),
        tuple((tuple(p.shape), p.dtype) for p in params),
        tuple(t for t, _ in kept),
    )
    return CapturedLoss(gm, noise_gm, param_names, params, signature, sparse,
                        [v for _, v in kept if isinstance(v, torch.Tensor)])


# ------------------------------------------------------------------------------------------- programs
def batch_key(args: tuple) -> tuple:
    """What a captured program is specialised to: the shapes, dtypes and devices of ``args`` (tensors, ``None``)."""
    return tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)


def notice_stderr(message: str) -> None:
    """One line on stderr, above any progress bar (``tqdm.write``)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


class CapturedPrograms:
    """Captured programs by key, shared by the training fast path and the evaluator's captured terms.

    A key's program is captured on its first use and verified by a second capture on the first call with other
    tensors (or again when asked: ``recheck``); :meth:`_run` runs it with the key's runner (:meth:`_runner`,
    the captured graph here; subclasses may compile).  :meth:`_give_up` ends the fast path with one notice.

    :param notice: where the one-line notices go.
    """

    #: Said before the first compiled call, which compiles (inductor: 15-75 s).
    compiling_notice = "compiling the captured ELBO with inductor (this step only) ..."

    def __init__(self, notice: Callable[[str], None] = notice_stderr):
        self.notice = notice
        self.captured: Dict[tuple, CapturedLoss] = {}
        self.verified: Dict[tuple, bool] = {}
        self.runners: Dict[tuple, Callable] = {}
        self.disabled: Optional[str] = None  # the reason, once it fell back
        self.compile_seconds: Optional[float] = None
        self._first_batch: Dict[tuple, list] = {}

    def _runner(self, key: tuple, cap: CapturedLoss) -> Callable:
        return cap.graph

    def _program(self, key: tuple, capture: Callable[[], CapturedLoss], tensors: list,
                 recheck: bool = False) -> CapturedLoss:
        """The program of ``key`` for the batch ``tensors``: captured now (``capture()``) on its first use,
        verified on the first other batch and whenever ``recheck``."""
        cap = self.captured.get(key)
        if cap is None:
            cap = self.captured[key] = capture()
            self.verified[key] = False
            self._first_batch[key] = tensors
            self.runners[key] = self._runner(key, cap)
        elif recheck or (not self.verified[key] and any(a is not b for a, b in zip(tensors, self._first_batch[key]))):
            if not cap.same_program(capture()):
                raise FastPathUnsupported(
                    "the captured program changed between batches (control flow or constants depend on values)"
                )
            self.verified[key] = True
            self._first_batch.pop(key, None)
        return cap

    def _run(self, key: tuple, cap: CapturedLoss, tensors: list):
        """``runners[key]`` on the parameters, the batch ``tensors`` and fresh noise.  The first compiled call is
        timed into ``compile_seconds``; if compiling fails the captured graph runs eagerly from then on."""
        inputs = (*cap.params, *tensors, *cap.noise_graph())
        run = self.runners[key]
        if run is cap.graph or self.compile_seconds is not None:
            return run(*inputs)
        self.notice(self.compiling_notice)  # a silent minute otherwise
        start = time.perf_counter()
        try:
            out = run(*inputs)
        except Exception as exc:  # compilation failed: keep the eager graph
            self.notice(f"fast path: compiling failed ({_first_line(exc)}); running the captured graph eagerly")
            self.runners[key] = cap.graph
            out = cap.graph(*inputs)
        self.compile_seconds = time.perf_counter() - start
        return out

    def _give_up(self, exc: FastPathUnsupported, instead: str) -> None:
        """The fast path ends here (every later call goes through Pyro): one notice with the reason."""
        self.disabled = str(exc)
        self.notice(f"fast path off: {exc}; {instead}")
