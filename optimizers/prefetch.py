"""Software prefetch for the CPU loops Inductor generates for our kernels.

Why: an optimizer kernel is one loop streaming many buffers (MADA's update: 8 read, 7 written; the
fused hyper-learning step's two kernels: 8 and 9 read). On the machine of docs/performance_xeon.md
(one thread of a 2-core Xeon VM), that loop moved 22 GB/s, the same as ``torch.optim.AdamW(fused=True)``
with its 4 streams, while a loop with MADA's streams and no arithmetic moved 27 GB/s. The ~60 vector
operations per 16 elements fill the out-of-order window, so fewer cache misses are in flight than
the memory could serve, and the hardware prefetchers do not run far enough ahead of 15 streams.
One prefetch instruction per stream and cache line, ``PREFETCH_BYTES`` ahead of the loop, lifts that
loop to 26-29 GB/s (MADA's update: 2.1x -> 1.8x fused AdamW on a 10.5M flat tensor).
On a 2-core AMD EPYC (Zen 4) VM (docs/performance.md) the kernels with next to no arithmetic ran
faster without the hints (MADA's update traffic: ~14 ms against ~18-23 on 10.5M elements) and
the real ones and the whole optimizer steps within the run-to-run noise of that machine: the hints
are kept, a per-CPU choice left for when it is measured on a quiet machine.

A prefetch is a hint: it changes no value (the kernels' outputs stay bit for bit the same, checked
in tests/test_fused.py) and never faults, even past the end of a buffer.

How: Inductor writes each CPU kernel as C++ source and compiles it through
``AsyncCompile.cpp_pybinding``; ``prefetching()`` wraps that call while ``optimizers.compiled``
compiles one of our graphs (also when Inductor's cache serves the graph: the source is compiled, or
its binary looked up, through the same call), and ``add_prefetch`` inserts the hints into every loop
that walks a buffer contiguously. Only our kernels' compilations are changed; a source that does not
look as expected is left as it is.
"""
from __future__ import annotations

import contextlib
import re
import threading
from typing import Iterator, List, Tuple

__all__ = ["PREFETCH_BYTES", "add_prefetch", "prefetching"]

# How far ahead of the loop each stream is prefetched. 512 B to 4 KiB measured the same (within
# noise) on the MADA update; 1 KiB is 16 cache lines, ahead of the hardware's own first misses.
PREFETCH_BYTES = 1024

# A loop step of fewer bytes than this is a scalar (not vectorized) loop: a prefetch per element
# would cost more than it saves.
_MIN_STEP_BYTES = 32

_ELEMENT_BYTES = {"double": 8, "float": 4, "int64_t": 8, "int32_t": 4, "int16_t": 2, "int8_t": 1, "uint8_t": 1,
                  "bool": 1, "bfloat16": 2, "half": 2, "c10::BFloat16": 2, "c10::Half": 2, "at::BFloat16": 2,
                  "at::Half": 2}
_SIGNATURE = re.compile(r'extern "C"\s+void\s+kernel\((.*?)\)\s*\{', re.S)
_POINTER = re.compile(r"^(?:const\s+)?([\w:]+)\s*\*\s*(\w+)$")
# Inductor's loops: for(int64_t x0=static_cast<int64_t>(0L); x0<...; x0+=static_cast<int64_t>(16L))
_LOOP = re.compile(r"for\(int64_t (x\w*)=[^;{}]*;[^;{}]*; \1\+=static_cast<int64_t>\((\d+)L\)\)\n([ \t]*)\{\n")
_MACRO = """#if defined(__GNUC__) || defined(__clang__)
#define HYPERGRAD_PREFETCH(address, write) __builtin_prefetch((address), (write), 3)
#else
#define HYPERGRAD_PREFETCH(address, write) ((void)0)
#endif
"""


def _block_end(source: str, start: int) -> int:
    """The index just past the ``}`` closing the block whose ``{`` is just before ``start``."""
    depth, i = 1, start
    while depth:
        opening, closing = source.find("{", i), source.find("}", i)
        if closing < 0:
            raise ValueError("unbalanced braces")
        if 0 <= opening < closing:
            depth, i = depth + 1, opening + 1
        else:
            depth, i = depth - 1, closing + 1
    return i


def add_prefetch(source: str, distance: int = PREFETCH_BYTES) -> Tuple[str, int]:
    """``source`` (an Inductor CPU kernel) with a prefetch of every buffer its vectorized loops walk
    contiguously, ``distance`` bytes ahead, and the number of buffers prefetched.

    A buffer qualifies in a loop over ``x`` when the loop body loads it (``loadu(ptr + x)``) or
    stores to it (``.store(ptr + x)``) at exactly the loop index; a stored one is prefetched for
    writing. Each iteration prefetches every cache line of its step (a step of 16 doubles spans two).
    Sources without that shape come back unchanged, with 0.
    """
    if distance <= 0:
        raise ValueError(f"distance must be a positive number of bytes, got {distance!r}")
    signature = _SIGNATURE.search(source)
    if signature is None:
        return source, 0
    element_bytes = {}
    for parameter in signature.group(1).split(","):
        m = _POINTER.match(parameter.strip())
        if m and m.group(1) in _ELEMENT_BYTES:
            element_bytes[m.group(2)] = _ELEMENT_BYTES[m.group(1)]
    pieces, cursor, covered, streams = [], 0, 0, set()
    for loop in _LOOP.finditer(source):
        if loop.start() < covered:  # nested in a loop already given prefetches: they cover this one
            continue
        var, step, indent = loop.group(1), int(loop.group(2)), loop.group(3)
        end = _block_end(source, loop.end())
        body = source[loop.end():end]
        at_index = re.escape(f" + static_cast<int64_t>({var}),") + "|" + re.escape(f" + static_cast<int64_t>({var}))")
        loaded = set(re.findall(r"loadu\((\w+)(?:" + at_index + ")", body))
        stored = set(re.findall(r"\.store\((\w+)(?:" + at_index + ")", body))
        hints = []
        for pointer in sorted(loaded | stored):
            size = element_bytes.get(pointer)
            if size is None or step * size < _MIN_STEP_BYTES:
                continue
            streams.add(pointer)
            for line in range(max(1, step * size // 64)):
                hints.append(f"{indent}    HYPERGRAD_PREFETCH({pointer} + {var} + {(distance + 64 * line) // size}, "
                             f"{int(pointer in stored)});\n")
        if hints:
            pieces += [source[cursor:loop.end()], *hints]
            cursor, covered = loop.end(), end
    if not streams:
        return source, 0
    pieces.append(source[cursor:])
    return _MACRO + "".join(pieces), len(streams)


_HOOK_LOCK = threading.Lock()


@contextlib.contextmanager
def prefetching(streams: List[int], distance: int = PREFETCH_BYTES) -> Iterator[None]:
    """While active, every CPU kernel Inductor compiles (or loads from its cache) goes through
    ``add_prefetch``; the number of buffers prefetched in each is appended to ``streams``. Our own
    compilations hold a lock for the duration, so two of them never interleave their hooks."""
    from torch._inductor.async_compile import AsyncCompile  # private API (pinned torch)

    original = AsyncCompile.cpp_pybinding

    def cpp_pybinding(self, argtypes, source_code):
        try:
            source_code, n = add_prefetch(source_code, distance)
        except ValueError:  # a source of another shape than we parse: compiled as it is
            n = 0
        streams.append(n)
        return original(self, argtypes, source_code)

    with _HOOK_LOCK:
        AsyncCompile.cpp_pybinding = cpp_pybinding
        try:
            yield
        finally:
            AsyncCompile.cpp_pybinding = original
