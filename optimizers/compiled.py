"""Compiled kernels whose calls cost little more than their arithmetic.

``torch.compile`` guards every Python object a compiled function reads, and re-checks those guards
on every call. The update of a ``Family`` walks its expression graph in Python, so a fused kernel
compiled directly carried about two thousand guards (on the expression nodes, their attributes,
the dicts of hyperparameters): 0.1-0.3 ms per call, once per parameter tensor and kernel, which on
a model of many small tensors cost more than the arithmetic itself.

``TensorKernel`` first traces the kernel with ``make_fx`` (symbolic shapes) into an FX graph of
aten operations on its tensor arguments — the family, the weight-decay mode and every other Python
value are baked into the graph — and compiles that graph, so a call guards only its tensor inputs.
The kernel may write into its arguments (``copy_``, ``add_``): the graph keeps those writes.

On the CPU the graph goes to Inductor directly, without Dynamo (whose frame evaluation and wrappers
still cost ~60 us per call): Inductor compiles it for symbolic sizes and storage offsets, and the
few guards that compilation assumed are evaluated once per distinct argument layout. Measured:
a fused Adam step on the 10.7M-parameter char GPT (26 kernel calls) went from 1.69x to 1.28x
``torch.optim.AdamW(fused=True)`` (on the Xeon VM of docs/performance_xeon.md, at the time).

Kernels compiled on that route also prefetch the buffers they stream (``optimizers.prefetch``):
a loop of many streams and much arithmetic otherwise leaves memory bandwidth unused. And they are
called without AOTAutograd's runtime wrappers (``_bare_call``), whose dozen Python frames cost
~110 us a call when the previous kernel has just streamed its tensors through the caches: fused
MADA at 2 threads went from 1.86-1.99x to 1.76-1.83x fused AdamW on the char GPT (paired runs).
"""
from __future__ import annotations

import copy
import functools
import logging
import re
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from .functional import device_tensor
from .prefetch import prefetching

log = logging.getLogger(__name__)

__all__ = ["TensorKernel", "BoundKernel", "segments", "SegmentPlan", "cat_flat", "SMALL_TENSOR"]


class TensorKernel:
    """``kernel(*tensors, *scalars)``: ``fn`` traced once per signature (dtype, rank, contiguity and
    device of each argument) into an FX graph, then compiled with dynamic shapes (one compilation
    serves every size). ``fn`` must take tensors only, its 0-D ones (hyperparameters, the step) last,
    and may not branch on their values.

    The 0-D arguments reach the compiled graph stacked into one vector per dtype and device: Dynamo
    would otherwise guard each 0-D tensor's value (a host read per scalar and call, a device
    synchronisation on a GPU). ``kern.bind(*scalars)`` stacks them once for many calls
    (``BoundKernel``: the segments of a bucket in one step share them); ``kern(*tensors, *scalars)``
    is ``kern.bind(*scalars)(*tensors)``.

    Compilation routes (``route``):

    * ``"inductor"`` (contiguous arguments on a CPU or a CUDA GPU; ``"auto"`` picks it there): the graph goes to
      Inductor directly (``compile_fx`` on fake inputs with symbolic sizes and storage offsets),
      without Dynamo, whose frame evaluation, guard tree and module-call wrappers cost ~60 us per
      call, more than the whole update of a 20k-element tensor. Instead, every guard Inductor's
      compilation recorded (sizes equal, sizes >= 2, a reduction longer than a chunk, strides...)
      is evaluated once per argument layout (dtypes, shapes, strides, storage offsets, devices);
      a layout that fails them gets a compilation of its own (on CUDA, also a size outside the
      power-of-4 class of the first: ``_guard_size_class``). On an H100 (GPT-2 124M shapes,
      ``experiments/gpu_diag.py``) this route took the fused MADA step from 11.1 to 3.7 ms and the
      hyper-learning step from 66 to 32 ms: Dynamo's call overhead dominated the fused step, and
      the hypergradient's reduction kernel took 34 ms of the 66 through Dynamo against 2.3 ms here
      (likely its split was sized for the first, small, tensor it compiled for).
    * ``"dynamo"``: ``torch.compile(graph, dynamic=True, fullgraph=True)`` (strided arguments, other
      devices, and the fallback, with a logged warning, if the direct compilation fails).
    """

    def __init__(self, fn: Callable[..., object], name: str, route: str = "auto"):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if route not in ("auto", "inductor", "dynamo"):
            raise ValueError(f"route must be 'auto', 'inductor' or 'dynamo', got {route!r}")
        self.fn, self.name, self.route = fn, name, route
        self._signatures: Dict[Tuple, _Signature] = {}
        # layout of the tensors (dtype, shape, stride, storage offset, device) and kinds of the
        # scalars -> the signature and the compilation that serve them: one dict lookup per call
        self._calls: Dict[Tuple, Tuple[_Signature, Callable, bool]] = {}

    def __call__(self, *args: Tensor):
        n = next((i for i, t in enumerate(args) if t.dim() == 0), len(args))
        return self.bind(*args[n:])(*args[:n])

    def bind(self, *scalars, device: Optional[torch.device] = None) -> "BoundKernel":
        """The kernel with its trailing 0-D arguments given once: ``kern.bind(*scalars)(*tensors)`` is
        ``kern(*tensors, *scalars)``; a call's layout check covers only the tensors. A scalar may be a
        Python number, which stands for a float64 0-D tensor on ``device`` (numbers cost no tensor each)."""
        return BoundKernel(self, scalars, device)

    def compiled_graphs(self) -> int:
        """How many graphs this kernel has compiled (every signature and shape variant)."""
        return sum(s.compilations for s in self._signatures.values())

    def routes(self) -> List[str]:
        """The route of each signature compiled so far ('inductor' or 'dynamo')."""
        return ["inductor" if s.direct else "dynamo" for s in self._signatures.values()]

    def bare_calls(self) -> List[bool]:
        """For each direct compilation so far, whether it is called without AOTAutograd's runtime
        wrappers (``_bare_call``)."""
        return [getattr(compiled, "bare", False) for s in self._signatures.values() for compiled, _ in s._variants]

    def prefetched_streams(self) -> List[List[int]]:
        """For each direct compilation so far, the number of buffers each of its C++ loops' kernels
        prefetches (``optimizers.prefetch``); empty when this process had already loaded the same
        compiled code (Inductor reuses the loaded module without compiling its source again)."""
        return [streams for s in self._signatures.values() for streams in s.prefetched]

    def _resolve(self, tensors: Tuple[Tensor, ...], scalars: Tuple[Tensor, ...], stacked: List[Tensor],
                 groups: Tuple[Tuple[int, ...], ...]) -> Tuple["_Signature", Callable, bool]:
        key = (tuple((t.dtype, t.dim(), t.is_contiguous(), t.device) for t in tensors + scalars), groups)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = self._trace(tensors, scalars, stacked, groups)
        return (sig, *sig.compiled_for([*tensors, *stacked]))

    def _trace(self, tensors: Tuple[Tensor, ...], scalars: Tuple[Tensor, ...], stacked: List[Tensor],
               groups: Tuple[Tuple[int, ...], ...]) -> "_Signature":
        """``groups``: which scalars each vector of ``stacked`` holds (``scalar_groups``)."""
        fn = self.fn

        def unpacked(*args):
            values: List[object] = [None] * len(scalars)
            for vec, group in zip(args[len(tensors):], groups):
                for m, i in enumerate(group):
                    values[i] = vec[m]
            return fn(*args[:len(tensors)], *values)

        example = [*tensors, *stacked]
        with torch.no_grad():  # an optimizer kernel: no autograd graph to record around it
            graph = make_fx(unpacked, tracing_mode="symbolic")(*example)  # fake copies: nothing is written
        graph.__class__.__name__ = self.name  # names the kernel in profiles and compile logs
        direct = self.route == "inductor" or (self.route == "auto" and all(
            t.device.type in ("cpu", "cuda") and t.is_contiguous() for t in example))
        return _Signature(graph, len(tensors), direct, self.name)


def scalar_groups(scalars: Sequence[object], device: Optional[torch.device] = None) -> List[List[int]]:
    """Indices of ``scalars`` by (dtype, device), in order of first appearance: one stacked vector each.
    A Python number counts as a float64 tensor on ``device``."""
    groups: Dict[Tuple, List[int]] = {}
    number_kind = (torch.float64, torch.device(device) if device is not None else None)
    for i, t in enumerate(scalars):
        groups.setdefault((t.dtype, t.device) if isinstance(t, Tensor) else number_kind, []).append(i)
    return list(groups.values())


class BoundKernel:
    """``TensorKernel.bind``: a kernel whose trailing 0-D arguments are fixed and already stacked."""

    def __init__(self, kernel: TensorKernel, scalars: Sequence[object], device: Optional[torch.device] = None):
        tensors = [t for t in scalars if isinstance(t, Tensor)]
        if any(t.dim() != 0 for t in tensors):
            raise ValueError(f"kernel {kernel.name}: the scalar arguments (after the tensors) must be 0-D, got "
                             f"shapes {[tuple(t.shape) for t in tensors]}")
        numbers = [x for x in scalars if not isinstance(x, Tensor)]
        if numbers and (device is None or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in numbers)):
            raise TypeError(f"kernel {kernel.name}: a scalar argument is a 0-D tensor, or a Python int or float "
                            f"with device= given; got {[type(x).__name__ for x in scalars]}, device={device!r}")
        self.kernel, self._values, self._device = kernel, tuple(scalars), device
        self._scalars: Optional[Tuple[Tensor, ...]] = None if numbers else self._values
        if numbers and not tensors:  # the usual case of FusedKernel: one vector, made at once
            groups = [list(range(len(numbers)))]
            self._stacked = [device_tensor(numbers, torch.float64, device)]
        else:  # a vector per (dtype, device); numbers as float64 tensors on device
            groups = scalar_groups(self._values, device)
            self._stacked = [torch.stack([self._tensor(self._values[i]) for i in g]) for g in groups]
        self._kinds = tuple((v.dtype, v.device, tuple(g)) for v, g in zip(self._stacked, groups))

    def _tensor(self, x) -> Tensor:
        return x if isinstance(x, Tensor) else device_tensor(float(x), torch.float64, self._device)

    @property
    def scalars(self) -> Tuple[Tensor, ...]:
        """The scalar arguments as 0-D tensors (made from the numbers when first asked: a new layout)."""
        if self._scalars is None:
            self._scalars = tuple(map(self._tensor, self._values))
        return self._scalars

    def __call__(self, *tensors: Tensor):
        return self.prepare(*tensors)()

    def prepare(self, *tensors: Tensor) -> Callable[[], object]:
        """``self(*tensors)`` as a call to make later: its arguments checked and its compilation found
        (or made) now. Preparing every call of a step first and then making them back to back keeps
        Python out of the gaps between kernels, where it runs cache-cold (``SegmentPlan``)."""
        kern = self.kernel
        layout = (_layout_of(tensors), self._kinds)
        hit = kern._calls.get(layout)
        if hit is None:
            if any(t.dim() == 0 for t in tensors):
                raise ValueError(f"kernel {kern.name}: 0-D arguments go last (or to bind())")
            hit = kern._calls[layout] = kern._resolve(tensors, self.scalars, self._stacked,
                                                      tuple(g for _, _, g in self._kinds))
        return functools.partial(hit[1], *tensors, *self._stacked)


class _Signature:
    """One signature (dtypes, ranks, contiguity, devices) of a ``TensorKernel``: its traced graph and
    its compilations."""

    def __init__(self, graph, n_tensors: int, direct: bool, name: str):
        self.graph, self.n_tensors, self.name, self.direct = graph, n_tensors, name, direct
        self.compilations = 0
        self._dynamo: Optional[Callable] = None
        self._variants: List[Tuple[Callable, Callable[[Sequence[Tensor]], bool]]] = []  # (compiled, its guards)
        self.prefetched: List[List[int]] = []  # per direct compilation: buffers prefetched per C++ kernel

    def compiled_for(self, args: List[Tensor]) -> Tuple[Callable, bool]:
        """The compilation serving arguments like ``args`` and whether it is a direct one: a direct one
        whose guards they pass (compiled now if none does), or the Dynamo one."""
        if self.direct:
            for compiled, guards in self._variants:
                if guards(args):
                    return compiled, True
            try:
                compiled, guards, streams = _compile_direct(self.graph, args, self.n_tensors)
            except Exception as exc:  # an Inductor limitation: the Dynamo route handles every graph
                log.warning("kernel %s: direct Inductor compilation failed (%s: %s); using torch.compile",
                            self.name, type(exc).__name__, exc)
                self.direct = False
            else:
                self.compilations += 1
                self._variants.append((compiled, guards))
                self.prefetched.append(streams)
                return compiled, True
        if self._dynamo is None:
            self._dynamo = torch.compile(self.graph, dynamic=True, fullgraph=True)
            self.compilations += 1
        return self._dynamo, False


def _graph_output(graph) -> object:
    return next(node for node in graph.graph.nodes if node.op == "output").args[0]


def _inductor_graph(compiled, depth: int = 8):
    """The ``CompiledFxGraph`` (Inductor's compiled code) inside the callable ``compile_fx`` returned:
    held by AOTAutograd's runtime wrappers, reached through their closures (whether compiled now or
    served by AOTAutograd's cache); ``None`` if not found within ``depth`` levels."""
    from torch._inductor.output_code import CompiledFxGraph

    seen, frontier = set(), [compiled]
    for _ in range(depth + 1):
        found, nxt = None, []
        for obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, CompiledFxGraph):
                found = obj if found is None else found
                continue
            nxt += [c.cell_contents for c in (getattr(obj, "__closure__", None) or ()) if _has_contents(c)]
            nxt += [v for v in getattr(obj, "__dict__", {}).values() if callable(v) or hasattr(v, "__dict__")]
            nxt += [getattr(obj, a) for a in ("__wrapped__", "__self__") if hasattr(obj, a)]
        if found is not None:
            return found
        frontier = nxt
    return None


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


# The generated Python wrapper's call: "def call(self, args):" then "arg0_1, arg1_1, ... = args"
_CALL_ARGS = re.compile(r"def call\(self, args\):\s*\n\s*((?:\w+, )*\w+),? = args\n")


def _bare_call(graph, compiled, n_args: int) -> Optional[Callable]:
    """Inductor's compiled code for ``graph`` called without AOTAutograd's runtime wrappers, or
    ``None`` when its graph is not the plain shape this relies on.

    Why: the wrappers (a dozen Python frames per call: input-mutation, aliasing and output
    bookkeeping for the general case) cost ~5 us per call with warm caches and ~110 us right after
    a kernel has streamed 120 MB through them (measured: a 64-element kernel, 181 us wrapped against
    64 us bare), and a step makes one call per tensor, each after one that streamed its tensor.

    What they did that our kernels need is done here: the inputs the compiled code writes
    (Inductor's ``mutated_input_idxs``) get their autograd version counters bumped, and the
    outputs come back as the traced function returned them. Anything else (other inputs than ours,
    another number of outputs, code not found) keeps the wrapped call."""
    found = _inductor_graph(compiled)
    call = getattr(found, "current_callable", None)
    match = _CALL_ARGS.search(getattr(found, "source_code", None) or "")
    strides = getattr(found, "output_strides", None)
    traced = _graph_output(graph)
    n_out = len(traced) if isinstance(traced, (tuple, list)) else 1  # (returning nothing: AOTAutograd's (None,))
    n_inputs = len(match.group(1).split(", ")) if match else -1
    if call is None or n_inputs != n_args or strides is None or len(strides) != n_out:
        log.debug("kernel %s: compiled code with %d inputs for %d arguments, %s outputs for %d: wrapped calls",
                  graph.__class__.__name__, n_inputs, n_args, None if strides is None else len(strides), n_out)
        return None
    written = sorted(found.mutated_input_idxs)
    bump = torch._C._increment_version
    if isinstance(traced, (tuple, list)):
        def unpack(result):
            return tuple(result)
    elif traced is None:
        def unpack(result):
            return None
    else:
        def unpack(result):
            return result[0]

    def bare(*args):
        result = call(list(args))  # (the compiled call empties the list it is given)
        if written:
            bump([args[i] for i in written])
        return unpack(result)

    bare.bare = True
    return bare


def _layout_of(tensors: Sequence[Tensor]) -> Tuple:
    """What a compilation depends on of its tensor arguments: dtype, shape, strides, storage offset
    and device of each."""
    return tuple((t.dtype, t.shape, t.stride(), t.storage_offset(), t.device) for t in tensors)


class _LayoutKey:
    """A post-grad pass that changes nothing (it runs the one configured before it, if any): its
    ``uuid`` is part of the key under which Inductor caches a compilation (FxGraphCache and
    AOTAutograd's cache), and it names the exact layout (sizes, strides, storage offsets, dtypes,
    devices) the compilation was made for.

    Why: our compilations have symbolic sizes but no size among the graph's inputs, so the cache
    keeps no guard for them and serves any cached code to any size; yet Inductor generates code
    from the size hints of the compilation and the guards of its shape environment (a reduction's
    split, a persistent reduction for a size known to be small; on a CPU, whether a reduction's loop
    is split among threads). Measured at 2 threads: a kernel of two sums compiled first for 1000
    elements (our guards then ask a new compilation for 10M) was served the 1000-element code, one
    thread, 5.9 ms a call on 10M elements against 3.1 ms keyed by layout. Keyed by the layout, a cached
    compilation is only reused for the arguments it was made for (other layouts then reuse it in
    this process only if its own guards admit them: ``_Signature.compiled_for``).

    Left as it is: a compilation the cache serves carries the guards of its tracing but not those
    its lowering recorded (a fresh one of the tiny model's vjp kernel was refused by the second
    bucket, a cached one was not), so in this process it may serve a layout its lowering did not
    plan for. On CUDA the size-class bounds (recorded before compiling) still keep each split
    sized for its class; on a CPU the one such difference measured is the threading decision above."""

    def __init__(self, layout: Tuple, inner):
        self.layout, self.inner = layout, inner

    def __call__(self, graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        inner = None if self.inner is None else self.inner.uuid()
        return None if self.inner is not None and inner is None else repr((self.layout, inner))


@functools.lru_cache(maxsize=None)
def _layout_key_pass() -> type:
    """``_LayoutKey`` as the ``CustomGraphPass`` Inductor asks a pass to be (imported on first use: a
    private torch API, whose failure sends a kernel to the Dynamo route like the rest of
    ``_compile_direct``)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass
    return type("LayoutKey", (_LayoutKey, CustomGraphPass), {})


def _cache_keyed_by_layout(args: Sequence[Tensor]):
    """A context in which Inductor's compilation caches are keyed by the layout of ``args`` too."""
    from torch._inductor import config

    key = _layout_key_pass()(_layout_of(args), config.post_grad_custom_post_pass)
    return config.patch(post_grad_custom_post_pass=key)


# Devices whose compilations each serve one size class (``_guard_size_class``).
SIZE_CLASS_DEVICES = ("cuda",)


def _guard_size_class(fakes: Sequence[Tensor], args: Sequence[Tensor]) -> None:
    """Guard every symbolic size to the power-of-4 class of the size it is compiled for,
    ``4^k <= n < 4^(k+1)``: a compilation then serves only sizes within a factor of 4 of its own.

    Why: Inductor sizes a Triton reduction's split (how many blocks share one sum) from the size
    hint of the compilation and records no guard for it, so a kernel compiled first for a small
    tensor runs its sums on one block each for every size. On an H100 the hypergradient's kernel,
    compiled for the small tensors of tests/test_cuda.py (then served by Inductor's cache, before
    ``_LayoutKey``), took 744 of a 750 ms fused hyper step on GPT-2 124M shapes; compiled for those
    shapes the step took 31 ms (experiments/gpu_diag.py). The class bounds recorded here join the
    guards ``_Signature.compiled_for`` checks, so another class gets a compilation of its own."""
    for fake, real in zip(fakes, args):
        for size, n in zip(fake.shape, real.shape):
            if isinstance(size, torch.SymInt) and n > 0:
                low = 1 << ((n.bit_length() - 1) // 2 * 2)
                # evaluating a SymBool (true for the size compiled for) records it as a guard
                bool(size >= low)
                bool(size < 4 * low)


def _compile_direct(graph, args: Sequence[Tensor], n_big: int
                    ) -> Tuple[Callable, Callable[[Sequence[Tensor]], bool], List[int]]:
    """Inductor's compilation of ``graph`` for arguments like ``args`` (dynamic sizes and offsets for
    the first ``n_big``, the tensors; static ones for the stacked scalar vectors after them), a
    check of every guard it assumed, static ones included (sizes, strides, storage offsets), which
    arguments must pass to use it, and the buffers prefetched by each of its C++ kernels
    (``optimizers.prefetch``). No 0/1 specialization and no duck sizing: a size or offset that
    happens to be 0, 1 or equal to another is not baked in."""
    # Private torch APIs (pinned torch): any failure here sends the kernel to the Dynamo route.
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP, DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv(specialize_zero_one=False, duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)
    fakes = [mode.from_tensor(a.detach(), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC if i < n_big else DimDynamic.STATIC] * a.dim()))
        for i, a in enumerate(args)]
    if any(a.device.type in SIZE_CLASS_DEVICES for a in args[:n_big]):
        _guard_size_class(fakes[:n_big], args[:n_big])
    streams: List[int] = []
    with torch.no_grad(), prefetching(streams), _cache_keyed_by_layout(args):
        compiled = compile_fx(copy.deepcopy(graph), fakes)
    bare = _bare_call(graph, compiled, len(args))
    if bare is not None:
        compiled = bare
    elif isinstance(_graph_output(graph), (tuple, list)):  # (the wrapped call returns a list)
        wrapped = compiled

        def compiled(*arguments):
            return tuple(wrapped(*arguments))
    code = shape_env.produce_guards_expression(fakes, ignore_static=False) or "True"
    expression = compile(code, f"<guards of {graph.__class__.__name__}>", "eval")

    def guards(arguments: Sequence[Tensor]) -> bool:
        return bool(eval(expression, SYMPY_INTERP, {"L": {f"t{i}": a for i, a in enumerate(arguments)}}))

    if not guards(args):
        raise RuntimeError(f"the compiled kernel's guards reject the arguments it was compiled for: {code}")
    return compiled, guards, streams


# A kernel call costs ~20-30 us (argument packing, Inductor's wrapper) whatever its size, and the
# per-step scalars of a bucket ~100 us more: below this many elements a tensor's update is cheaper
# packed with its neighbours (copied to a flat tensor and back) than given a call of its own.
# LayerNorm weights and biases are all below it. (Measured on the demo GPT, all of whose tensors
# are below 2^17: packing them stayed faster than one call per tensor above 2^13 or 2^15.)
# A GPU uses the same limit for now. Packing more there (tensors below 2^22, in runs of up to 2^25
# elements) was once measured 23x slower for the hyper-learning step on GPT-2 124M shapes (752 ms
# against 32), but that run, like one with the CPU's packing later (750 ms), came after the tests had
# filled Inductor's cache with the vjp kernel compiled for small tensors (see ``_LayoutKey``): the
# packing was not the cause, and whether it pays on a GPU (the step there is bound by ~1500 kernel
# launches) is still to be measured. On a CPU one packed run of a whole 10.7M-parameter bucket took
# the hyper step from 31 to 56 ms (its packed run is concatenated ~8 times a step).
SMALL_TENSOR = 1 << 17


def segments(tensors: Sequence[Tensor], groups: Optional[Sequence[Hashable]] = None,
             small: int = SMALL_TENSOR) -> List[Tuple[int, int, List[int]]]:
    """The kernel calls over ``tensors`` laid out back to back in flat buffers, as
    ``(offset, numel, indices)``: a run of consecutive contiguous tensors below ``small`` elements
    and of the same group (``groups[i]``: e.g. their coefficient set) is one call; any other tensor
    has its own."""
    if groups is not None and len(groups) != len(tensors):
        raise ValueError(f"groups has {len(groups)} entries for {len(tensors)} tensors")
    out: List[Tuple[int, int, List[int]]] = []
    packable_run, run_group, offset = False, None, 0
    for i, t in enumerate(tensors):
        n, group = t.numel(), (None if groups is None else groups[i])
        packable = n < small and t.is_contiguous()
        if packable and packable_run and out and group == run_group:
            start, total, idxs = out[-1]
            out[-1] = (start, total + n, idxs + [i])
        else:
            out.append((offset, n, [i]))
            run_group = group
        packable_run = packable
        offset += n
    return out


def cat_flat(tensors: Sequence[Optional[Tensor]], like: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``tensors`` back to back as one flat tensor of ``dtype`` (``None``: zeros shaped like the
    matching entry of ``like``). A single contiguous tensor of that dtype comes back as a view."""
    if len(tensors) == 1 and tensors[0] is not None and tensors[0].is_contiguous() and tensors[0].dtype == dtype:
        return tensors[0].view(-1)
    parts = [(t if t is not None else torch.zeros_like(ref)).reshape(-1).to(dtype) for t, ref in zip(tensors, like)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _nothing():
    pass


class SegmentPlan:
    """The kernel calls of one bucket (``segments``) with what stays the same from step to step made
    once: each segment's slice of every flat buffer it reads or writes, and the flat view of each
    contiguous parameter.

    Why: a view is a new tensor, and once a kernel has streamed a few hundred MB through the caches
    the Python that makes one runs cache-cold (~5 us). A step made 8-10 per segment: on the 10.75M
    char GPT (26 segments) our Python between the kernels took ~2.9 ms of a 27 ms fused MADA step,
    and with 2 threads a fifth of the step. This plan, with the calls of a bucket made back to back
    (``BoundKernel.prepare``), took 2-5% off the fused MADA steps in paired runs.

    ``views(buffer)`` are the slices of ``buffer`` per segment, shaped as its kernel sees them (flat,
    or a strided parameter's own shape), made on first use and kept while ``buffer`` is the same
    object (the plan holds it: an ``id`` is not reused while it is alive). ``tensors(i, ...)`` is
    what segment ``i``'s kernel works on this step, after ``check(params)``. A plan belongs to a
    bucket: its parameters are fixed, their storage and layout may change (checked every step).
    """

    # Buffers a plan has seen (with their views) are few (a bucket's state, its gradient records):
    # more means they were replaced, and the old ones are let go rather than kept alive.
    MAX_BUFFERS = 64

    def __init__(self, params: Sequence[Tensor], groups: Optional[Sequence[Hashable]] = None,
                 small: int = SMALL_TENSOR):
        self._groups, self._small = groups, small
        self._make(params)

    @staticmethod
    def _layout(params: Sequence[Tensor]) -> Tuple:
        return tuple(None if p.is_contiguous() else p.shape for p in params)

    def _make(self, params: Sequence[Tensor]) -> None:
        self.segments = segments(params, self._groups, self._small)
        self._params_layout = self._layout(params)
        # a strided parameter runs in its own shape (its buffers' slices viewed so); others flat
        self._shapes = [None if len(idxs) > 1 else self._params_layout[idxs[0]] for _, _, idxs in self.segments]
        self._x: List[Optional[Tensor]] = [None] * len(self.segments)
        self._views: Dict[int, Tuple[Tensor, List[Tensor]]] = {}

    def check(self, params: Sequence[Tensor]) -> None:
        """Once per step, before ``views``: if a parameter was made strided (or contiguous again) since
        the plan was made, the calls are planned anew (a strided tensor is never packed, and runs in
        its own shape)."""
        if self._layout(params) != self._params_layout:
            self._make(params)

    def views(self, buffer: Tensor) -> List[Tensor]:
        """Per segment, its slice of the flat ``buffer``, shaped like the segment's ``x``."""
        entry = self._views.get(id(buffer))
        if entry is None or entry[0] is not buffer:
            if len(self._views) >= self.MAX_BUFFERS:
                self._views.clear()
            slices = [buffer[off:off + n] for off, n, _ in self.segments]
            entry = self._views[id(buffer)] = (buffer, [v if shape is None else v.view(shape)
                                                        for v, shape in zip(slices, self._shapes)])
        return entry[1]

    def tensors(self, i: int, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                packed_grad: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Callable[[], None]]:
        """``(x, g, finish)`` of segment ``i`` this step: the parameter and its gradient, flat (for a
        packed run, flat copies; for a strided parameter, itself and its gradient made contiguous).
        ``finish()`` copies a packed ``x`` back into its parameters after the call (nothing
        otherwise). ``packed_grad``: the packed run's gradients, already concatenated in this step (by
        an earlier kernel of the step), used instead of a new copy."""
        _, _, idxs = self.segments[i]
        p, g = params[idxs[0]], grads[idxs[0]]
        if len(idxs) > 1:
            run = [params[j] for j in idxs]
            x = torch.cat([q.view(-1) for q in run])

            def finish():
                torch._foreach_copy_([q.view(-1) for q in run], list(torch.split(x, [q.numel() for q in run])))

            g_flat = packed_grad if packed_grad is not None else cat_flat([grads[j] for j in idxs], run, p.dtype)
            return x, g_flat, finish
        if self._shapes[i] is not None:
            return p, g.contiguous(), _nothing
        x = self._x[i]
        if x is None or x.data_ptr() != p.data_ptr() or x.numel() != p.numel():  # (contiguous: ``check``)
            # detached: an alias without autograd history (a view made under no_grad of a parameter
            # that requires grad would be "created in no_grad mode", and tracing a kernel for a new
            # layout rejects such a view once its base has been written); it shares the version counter
            x = self._x[i] = p.detach().view(-1)
        return x, (g if g.is_contiguous() else g.contiguous()).view(-1), _nothing
