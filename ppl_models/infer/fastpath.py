r"""The engine's fast path: Pyro's ELBO captured once as a pure tensor function of (parameters, batch, noise).

Every Pyro step re-runs the guide and the model through Pyro's effect handlers, builds two traces,
re-registers every ``pyro.module`` parameter and scores every site in Python.  For a given model,
guide, objective and batch shape that work is the same every step; only the numbers change.  The fast
path does it once and keeps only the numbers:

1. **Capture**, **rewrite** and **verify** (:mod:`ppl_models.infer.capture`): ``make_fx`` records the aten
   operations of Pyro's own objective — the guide and the model replayed on its draws and the surrogate loss,
   so plates, ``num_data / batch`` scales, masks, analytic KLs (``TraceMeanField_ELBO``) and particle
   averaging are Pyro's, not re-implemented — rewritten into ``loss = f(parameters, batch, noise)`` with the
   random draws in a separate noise graph run eagerly with torch's global generator (the same draws, in
   the same order, as Pyro's eager step, so trajectories match); the graph captured again on the next batch
   must be the same program, else the engine falls back.
2. **Run.** ``loss = f(*params, *batch, *noise); loss.backward()`` eagerly (``mode="eager"``), or, with
   ``mode="compile"``, ``grad_and_value`` of ``f`` traced into one forward-and-backward graph and compiled by
   inductor (:class:`JointGradient`: no autograd engine at run time, as ``jax.jit`` of ``value_and_grad``;
   :class:`CompiledGraph`: no dynamo either), or eagerly first and compiled only when the rest of the run
   repays the compile time (``mode="auto"``, see :data:`AUTO_COMPILE_COST_S`).  The engine's optimizer
   (fused Adam for dense parameters, ``SparseAdam`` for per-datapoint tables) then steps.

Unsupported, with a one-line notice and Pyro's ELBO instead (:class:`FastPathUnsupported`): objectives
other than ``Trace_ELBO`` / ``TraceMeanField_ELBO`` / ``IWAE`` (:class:`~ppl_models.infer.objectives.IWAE_ELBO`,
its particles in one log-sum-exp per datapoint) and the estimators on them (``reparameterized``,
``analytic-kl``, ``sticking-the-landing``), guide sites without ``rsample`` (discrete or
score-function sites), enumerated sites, model latents absent from the guide, random draws that depend
on the inputs, a graph that changes between batches.  Pyro validation steps (the first step, or
``validate="always"``) always run through Pyro, so the first step checks everything Pyro checks.
A new batch shape (the short last batch of an epoch) gets its own capture (eager; only the first
shape is compiled).

Not covered by the verification: control flow on values that takes the same branch on both captured
batches (:class:`FastPath`'s ``verify_every=K`` re-captures every K steps and compares again).  A
parameter replaced in the param store after the capture also falls back.

Private APIs: those of the capture (:mod:`ppl_models.infer.capture`), and ``torch._inductor.compile``
(inductor on an FX graph, without dynamo): if it fails, the captured graph runs eagerly, with one notice.

Speed (``benchmarks/bench_fast_path.py``): the eager captured step removes Pyro's per-step Python work;
compiling fuses the elementwise work around the matrix products, which dominate a VAE step on a CPU.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from torch import fx

from ppl_models.infer.capture import (
    CapturedLoss,
    CapturedPrograms,
    FastPathUnsupported,
    batch_key,
    capture_function,
    capture_loss,
    notice_stderr,
    unsupported_objective,
    with_tensors,
)

__all__ = [
    "FAST_PATH_MODES",
    "CapturedTerms",
    "CompiledGraph",
    "JointGradient",
    "FastPath",
    "fast_path_mode",
    "fast_path_status",
    "make_fast_path",
]

aten = torch.ops.aten

#: Values of the engine's ``fast_path`` option: off, the captured graph run eagerly, compiled, or "auto":
#: eager for :data:`AUTO_PROBE_STEPS` steps, then compiled only if the steps the run still plans, at the
#: measured eager step time, would save more than the expected compile time.
FAST_PATH_MODES = (False, True, "eager", "compile", "auto")

#: "auto": eager steps timed before deciding.
AUTO_PROBE_STEPS = 50
#: "auto": expected seconds to compile, on the safe side.  Measured by benchmarks/bench_fast_path.py (VAE
#: 784-400-20, the project's 2-core machine): 15-19 s with a cold inductor cache on the idle machine, 34-84 s
#: under other jobs' load.
AUTO_COMPILE_COST_S = 90.0
#: "auto": fraction of the eager step time compiling is expected to save (same script: 16 % on one thread,
#: 25 % on two).
AUTO_COMPILE_SAVING = 0.12

def fast_path_mode(value) -> Optional[str]:
    """Normalise the ``fast_path`` option: ``None`` (off), ``"eager"``, ``"compile"`` or ``"auto"``."""
    if value is False or value is None or value == "off":
        return None
    if value is True or value == "eager":
        return "eager"
    if value in ("compile", "auto"):
        return value
    raise ValueError(f"fast_path: expected one of false, true, 'eager', 'compile', 'auto'; received {value!r}")


# ------------------------------------------------------------------------------------------- the runner
class CompiledGraph:
    """An aten graph compiled by inductor directly (``torch._inductor.compile``), without dynamo.

    The graphs here are already pure aten graphs of tensors (captured by ``make_fx``), so dynamo has nothing
    to trace; going around it removes its per-call work — the frame's cache lookup, guards over every input,
    the runtime wrappers — about 0.6 ms of a 6 ms VAE step on this project's machine
    (``benchmarks/bench_fast_path.py``).  Without guards the sizes, strides, dtypes and devices of the inputs
    are checked here instead: the compiled code is specialised to those of its example, and a call with
    others compiles again for them (a new program, as a new dynamo guard failure would).  The first call
    compiles.

    :param gm: the graph; flat tensor inputs, a flat tuple of tensors out.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.compiled: Dict[tuple, Callable] = {}

    @staticmethod
    def _spec(inputs) -> tuple:
        return tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs)

    def _compile(self, inputs) -> Callable:
        import torch._inductor

        run = self.compiled[self._spec(inputs)] = torch._inductor.compile(self.gm, list(inputs))
        return run

    def __call__(self, *inputs):
        run = self.compiled.get(self._spec(inputs))
        if run is None:
            run = self._compile(inputs)
        return run(*inputs)


def _sparse_lookups(cap: CapturedLoss) -> Optional[List[Tuple[fx.Node, int, int]]]:
    """The ``embedding(..., sparse=True)`` lookups of ``cap`` as ``(node, parameter position, index input
    position)``, when the joint graph can take their rows as inputs: each table is a parameter read only by
    its one lookup, indexed by an input tensor of the batch, without ``padding_idx`` or frequency scaling.
    ``None`` when some lookup is not of that form."""
    placeholders = [n for n in cap.graph.graph.nodes if n.op == "placeholder"]
    position = {node: i for i, node in enumerate(placeholders)}
    num_params = len(cap.params)
    found = []
    for node in cap.graph.graph.nodes:
        if not (node.op == "call_function" and node.target is aten.embedding.default):
            continue
        weight, indices, *rest = node.args
        padding_idx, scale_grad, sparse = (list(rest) + [-1, False, False])[:3]
        if not sparse:
            continue
        if (position.get(weight, num_params) >= num_params or len(weight.users) != 1
                or position.get(indices, -1) < num_params or padding_idx != -1 or scale_grad):
            return None
        found.append((node, position[weight], position[indices] - num_params))
    return found


class JointGradient:
    """The compiled runner of a captured loss: loss and gradients as one pure graph, like ``jax.jit`` of
    ``value_and_grad``.

    On its first call ``torch.func.grad_and_value`` of the captured graph with respect to the parameters it
    uses is traced (``make_fx``) into one forward-and-backward graph of flat tensors and compiled by inductor
    (:class:`CompiledGraph`); every call then returns ``(loss, [(param, grad), ...])`` without running torch's
    autograd engine or dynamo, so the compiled step has no autograd graph to build, no backward graph to
    interpret, no guards to check and no per-step autograd bookkeeping (measured with
    ``benchmarks/bench_fast_path.py``).  Parameters the loss does not use get no gradient, as in Pyro.

    Per-datapoint tables (``nn.Embedding(sparse=True)``, the mean-field guide's λ): the batch's rows are
    gathered before the graph and are its inputs; the graph returns their gradient, and the table's gradient is
    the sparse tensor ``embedding``'s own backward builds from it — the batch's indices and those rows — so the
    engine's ``SparseAdam`` still reads and writes only the batch's rows.  :func:`_sparse_lookups` says which
    lookups qualify; with others the fast path runs eagerly.

    :param compile: ``False`` runs the traced joint graph eagerly (for tests).
    """

    def __init__(self, cap: CapturedLoss, compile: bool = True):
        lookups = _sparse_lookups(cap)
        if lookups is None:
            raise FastPathUnsupported("a sparse lookup the compiled graph cannot take rows for")
        self.cap, self.compile = cap, compile
        graph, copies = fx.Graph(), {}
        graph.output(graph.graph_copy(cap.graph.graph, copies))
        self.rows = []  # (parameter position, index input position) of each row input
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        for k, (node, weight_pos, index_pos) in enumerate(lookups):  # each lookup becomes an input
            with graph.inserting_after(last):
                last = graph.placeholder(f"rows_{k}")
            copies[node].replace_all_uses_with(last)
            graph.erase_node(copies[node])
            self.rows.append((weight_pos, index_pos))
        graph.eliminate_dead_code()
        self.graph = fx.GraphModule(cap.graph, graph)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.used = [i for i, node in enumerate(placeholders[: len(cap.params)]) if node.users]
        self.fn: Optional[Callable] = None

    def _build(self, inputs: list) -> Callable:
        from torch.func import grad_and_value
        from torch.fx.experimental.proxy_tensor import make_fx

        cap, used, graph = self.cap, self.used, self.graph
        detached = [p.detach() for p in cap.params]  # views of the live parameters: the optimizer's updates show
        num_used, num_rows = len(used), len(self.rows)

        def loss(*flat):  # (used parameters, rows, batch tensors, noise)
            params = list(detached)
            for i, p in zip(used, flat[:num_used]):
                params[i] = p
            rows = flat[num_used : num_used + num_rows]
            return graph(*params, *flat[num_used + num_rows :], *rows)

        def joint(*flat):
            grads, value = grad_and_value(loss, argnums=tuple(range(num_used + num_rows)))(*flat)
            return (*grads, value)

        used_detached = [detached[i] for i in used]
        lookups = [(detached[w], cap.params[w], i) for w, i in self.rows]

        def gather(inputs):
            return [torch.nn.functional.embedding(inputs[i], table) for table, _, i in lookups]

        with torch.random.fork_rng(devices=[]):
            traced = make_fx(joint)(*used_detached, *gather(inputs), *inputs)
        run = CompiledGraph(traced) if self.compile else traced
        used_params = [cap.params[i] for i in used]

        def call(inputs):
            out = run(*used_detached, *gather(inputs), *inputs)
            grads = list(zip(used_params, out[:num_used]))
            for (table, param, i), rows_grad in zip(lookups, out[num_used:-1]):
                index = inputs[i].reshape(1, -1)
                values = rows_grad.reshape(index.shape[1], -1)
                grads.append((param, torch.sparse_coo_tensor(index, values, table.shape, check_invariants=False)))
            return out[-1], grads

        return call

    def __call__(self, *inputs):
        """``inputs`` as the captured graph takes them (parameters, batch tensors, noise)."""
        inputs = list(inputs[len(self.cap.params) :])
        if self.fn is None:
            self.fn = self._build(inputs)
        return self.fn(inputs)


class FastPath(CapturedPrograms):
    """Loss and gradients of ``elbo`` for ``model``/``guide`` from captured graphs, one per batch shape.

    :param elbo: a Pyro ``Trace_ELBO`` or ``TraceMeanField_ELBO``, an
        :class:`~ppl_models.infer.objectives.IWAE_ELBO`, or an estimator on one of them (its
        ``max_plate_nesting`` set; :func:`~ppl_models.infer.capture.unsupported_objective`).
    :param kwargs: keyword arguments of model and guide (``num_data``); a step may pass others (an annealed KL
        weight), and then every program must show, captured again, that it is the same with them.
    :param mode: ``"eager"``, ``"compile"`` or ``"auto"`` (see :func:`fast_path_mode`).
    :param planned_steps: steps the run still plans (for ``"auto"``); ``None``: unknown (eager).
    :param verify_every: re-capture and compare every this many steps (0: only on the second batch).
    :param notice: where the one-line notices go.
    """

    def __init__(self, elbo, model: Callable, guide: Callable, kwargs: dict, *, mode: str = "eager",
                 planned_steps: Optional[int] = None, verify_every: int = 0,
                 notice: Callable[[str], None] = notice_stderr):
        reason = unsupported_objective(elbo)
        if reason is not None:
            raise FastPathUnsupported(reason)
        super().__init__(notice)
        self.elbo, self.model, self.guide, self.kwargs = elbo, model, guide, dict(kwargs)
        self.mode = mode
        self.compile = mode == "compile"
        self.planned_steps = planned_steps
        self._probe_start: Optional[float] = None
        self.verify_every = int(verify_every)
        self.steps = 0
        self._compile_key: Optional[tuple] = None
        self._stale: set = set()  # keys captured with other keyword arguments

    # ------------------------------------------------------------------ structure
    def _runner(self, key: tuple, cap: CapturedLoss) -> Callable:
        if self.compile and (self._compile_key is None or self._compile_key == key):
            self._compile_key = key
            try:
                return JointGradient(cap)
            except FastPathUnsupported as exc:
                self.notice(f"fast path: not compiling ({exc}); running the captured graph eagerly")
        return cap.graph

    def prepare(self, args: tuple, kwargs: Optional[dict] = None) -> Tuple[tuple, CapturedLoss]:
        if kwargs is not None and kwargs != self.kwargs:
            self.kwargs = dict(kwargs)
            self._stale.update(self.captured)
        key = batch_key(args)
        recheck = key in self._stale or (
            self.verify_every > 0 and self.steps > 0 and self.steps % self.verify_every == 0)
        self._stale.discard(key)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        cap = self._program(key, lambda: capture_loss(self.elbo, self.model, self.guide, args, self.kwargs),
                            tensors, recheck)
        params = pyro.get_param_store()._params
        for name, tensor in zip(cap.param_names, cap.params):
            if params.get(name) is not tensor:
                raise FastPathUnsupported(f"parameter {name!r} was replaced in the param store after the capture")
        return key, cap

    # ------------------------------------------------------------------ one step
    def loss_and_grads(self, args: tuple, kwargs: Optional[dict] = None) -> float:
        """The loss value (float) of ``args`` (and ``kwargs``, by default those of the constructor); gradients
        accumulated into the parameters when it is finite."""
        key, cap = self.prepare(args, kwargs)
        out = self._run(key, cap, [a for a in args if isinstance(a, torch.Tensor)])
        loss, grads = out if isinstance(out, tuple) else (out, None)  # a JointGradient: no autograd graph
        value = loss.item()
        if math.isfinite(value):
            if grads is None:
                loss.backward()
            for p, g in grads or ():
                p.grad = g if p.grad is None else p.grad + g
        self.steps += 1
        if self.mode == "auto" and not self.compile:
            self._auto_decide()
        return value

    def _auto_decide(self) -> None:
        """``"auto"``: after :data:`AUTO_PROBE_STEPS` eager steps, compile when the rest of the run repays it."""
        if self.steps == 1:
            self._probe_start = time.perf_counter()
        elif self.steps == AUTO_PROBE_STEPS + 1 and self._probe_start is not None:
            step_s = (time.perf_counter() - self._probe_start) / AUTO_PROBE_STEPS
            left = None if self.planned_steps is None else self.planned_steps - self.steps
            if left is not None and left * step_s * AUTO_COMPILE_SAVING > AUTO_COMPILE_COST_S:
                self.compile = True
                self.runners = {k: self._runner(k, cap) for k, cap in self.captured.items()}

    def try_loss_and_grads(self, args: tuple, kwargs: Optional[dict] = None) -> Optional[float]:
        """:meth:`loss_and_grads`, or ``None`` when Pyro must take this step: a validation step, or the fast
        path does not apply (then a one-line notice says why, once, and every later call returns ``None``)."""
        if self.disabled is not None or is_validation_enabled():
            return None
        try:
            return self.loss_and_grads(args, kwargs)
        except FastPathUnsupported as exc:
            self._give_up(exc, f"using Pyro's {type(self.elbo).__name__} for every step")
            return None


def make_fast_path(trainer) -> Optional[FastPath]:
    """The :class:`FastPath` for an engine :class:`~ppl_models.infer.engine.Trainer` (after its set-up: its
    ``objective`` and ``loss_kwargs()``), or ``None`` when its settings rule it out: the reason goes to
    ``trainer.fast_path_off`` and, unless the mode is ``"auto"``, to a one-line notice."""
    mode = fast_path_mode(trainer.fast_path)
    if mode is None:
        return None
    objective = trainer.objective
    name = type(objective).__name__
    reason = None
    if trainer.step_fn is not None:  # a step rule may say why (strategies.RefinedJointStep.fast_path_off)
        reason = getattr(trainer.step_fn, "fast_path_off", None) or "a strategy's step rule replaces the joint step"
    elif trainer.validate == "always":
        reason = "validate='always' checks every step through Pyro"
    else:
        reason = unsupported_objective(objective)
    if reason is not None:
        trainer.fast_path_off = reason  # the run records it (FitResult.fast_path = "off: <reason>")
        if mode != "auto":  # "auto", the default, takes the fast path where it applies and says so only in the record
            notice_stderr(f"fast path off: {reason}; using Pyro's {name} for every step")
        return None
    total = trainer.max_steps if trainer.max_steps is not None else trainer.num_epochs * trainer.num_batches
    return FastPath(objective, trainer.model, trainer.guide, trainer.loss_kwargs(), mode=mode,
                    planned_steps=max(0, total - trainer.step))


def fast_path_status(trainer, fast: Optional[FastPath]) -> str:
    """The path an engine :class:`~ppl_models.infer.engine.Trainer`'s training steps take, ``fast`` being its
    fast path (``None``: none was set up) — the run's record:
    ``"compile"``, ``"eager"`` (with the reason when another mode was asked for) or ``"off: <reason>"``."""
    mode = fast_path_mode(trainer.fast_path)
    if mode is None:
        return "off: fast_path = false"
    if trainer.parallel is not None:
        return "off: several processes or a GPU"
    if fast is None:
        return f"off: {getattr(trainer, 'fast_path_off', None) or 'not set up yet'}"
    if fast.disabled is not None:
        return f"off: {fast.disabled} (after {fast.steps} steps on the fast path)"
    if any(run is not fast.captured[key].graph for key, run in fast.runners.items()):
        return "compile"
    if mode == "auto":
        return "eager (auto: compiling would not repay itself in this run)"
    return "eager" if mode == "eager" else "eager (compiling failed; see the notice)"


# --------------------------------------------------------------------------------------- evaluation
class CapturedTerms(CapturedPrograms):
    """The importance-sampling evaluator's per-chunk terms from captured graphs (``evaluate(fast_path=...)``).

    Each chunk's Pyro computation (guide, model replayed on its draws, per-site log-densities) is captured
    once per (chunk size, batch shape) as a graph of (parameters, batch, noise), verified on its first other
    batch like the training fast path, and run eagerly or — ``mode="compile"``, for the first shape — compiled
    by inductor (:class:`CompiledGraph`), which fuses the elementwise work after the decoder's products.  The
    draws are Pyro's, in Pyro's order, so the results equal the Pyro path's up to float rounding.  Anything the
    capture does not handle ends the fast path with one notice; the evaluator then continues through Pyro.

    :param mode: ``"eager"`` or ``"compile"``.
    """

    compiling_notice = "compiling the captured evaluation with inductor (first batch only) ..."

    def __init__(self, mode: str = "compile", notice: Callable[[str], None] = notice_stderr):
        if mode not in ("eager", "compile"):
            raise ValueError(f"mode: expected 'eager' or 'compile', received {mode!r}")
        super().__init__(notice)
        self.mode = mode
        self._compiled_key: Optional[tuple] = None

    def chunk_terms(self, chunk: Callable, data: tuple, idx) -> Optional[tuple]:
        """``chunk(data, idx)`` computed by its captured graph, or ``None`` when Pyro must compute it."""
        if self.disabled is not None:
            return None
        args = (*data, idx)
        try:
            key = (chunk.keywords.get("size") if hasattr(chunk, "keywords") else None, batch_key(args))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            n_data = len(tensors) - int(isinstance(idx, torch.Tensor))

            def capture():
                return capture_function(
                    lambda *ts: chunk(with_tensors(data, ts[:n_data]), ts[n_data] if n_data < len(ts) else idx),
                    args,
                )

            cap = self._program(key, capture, tensors)
            return tuple(self._run(key, cap, tensors))
        except FastPathUnsupported as exc:
            self._give_up(exc, "evaluating through Pyro")
            return None

    def _runner(self, key: tuple, cap: CapturedLoss) -> Callable:
        if self.mode == "compile" and self._compiled_key is None:
            self._compiled_key = key
            return CompiledGraph(cap.graph)
        return cap.graph
