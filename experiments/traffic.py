"""Plain-C loops with the memory traffic of an optimizer step and next to no arithmetic: the least a
loop with that traffic costs on this machine (table g of ``experiments.bench_step``).

Why plain C next to the compiled traffic-only kernels (``vjp_io``, ``update_io``, ``rule_io``): those
show what Inductor's loops cost for the traffic; these are the fewest instructions a compiler makes
of it (``-O3 -march=native``, OpenMP at torch's thread count), so no code generator stands between
the measurement and the memory system. With float32 buffers of ``N`` elements and ``S`` state
buffers (MADA: 6):

* ``adamw``: torch's AdamW update itself (decoupled decay, bias corrections), reading p, g, m, v and
  writing p, m, v: the same traffic as ``AdamW(fused=True)``, written as plainly, and checked against
  ``torch.optim.AdamW`` (tests/test_experiments_smoke.py)::

      p <- p (1 - lr wd);  m <- m + (1 - b1)(g - m);  v <- b2 v + (1 - b2) g^2
      p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

* ``vjp_io``: the reduction of a hyper step: reads the new gradient w, the last gradient g_old and
  the S states, returns S sums (``sum w (s_0 + g_old)``, ``sum w s_k``): S + 2 buffers read;
* ``rule_io``: a fixed rule's traffic: ``s_k <- 0.9 s_k + 0.1 g`` for every state, then
  ``x <- x - 1e-3 (s_0 + ... + s_{S-1})``: S + 2 read, S + 1 written (as ``bench_step._rule_io``);
* ``hyper_io``: ``vjp_io`` then ``rule_io``, the traffic that any exact hyper-learning step needs at
  the least (2S + 4 read, S + 1 written): the update waits for the reduction, so the new gradient and
  the state are read in both passes.

Sums: float32 over 4096-element chunks (vectorized), the chunks in float64, as the native MADA kernel
sums. Each loop splits its range statically between the threads.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["TrafficLoops"]

_CHUNK = 4096


def _source(S: int) -> str:
    """The C source for ``S`` state buffers (named pointers s0..s{S-1}: the compiler sees S distinct
    restrict streams, as in a kernel written for one rule)."""
    states = ", ".join(f"float* restrict s{k}" for k in range(S))
    const_states = ", ".join(f"const float* restrict s{k}" for k in range(S))
    names = ", ".join(f"s{k}" for k in range(S))
    sums = ", ".join(f"a{k}" for k in range(S))
    zero = ", ".join(f"a{k} = 0" for k in range(S))
    body_sums = " ".join(f"a{k} += wi * s{k}[i];" for k in range(1, S))
    add_chunk = " ".join(f"acc[{k}] += a{k};" for k in range(S))
    ema = " ".join(f"s{k}[i] = 0.9f * s{k}[i] + 0.1f * gi;" for k in range(S))
    total = " + ".join(f"s{k}[i]" for k in range(S))
    return f"""#include <math.h>
#include <stdint.h>
#include <omp.h>
#define CHUNK {_CHUNK}
#define MAX_THREADS 256

void adamw(int64_t N, float* restrict p, const float* restrict g, float* restrict m, float* restrict v,
           const double* restrict sc, int threads) {{
  /* sc: lr, beta1, beta2, eps, weight_decay, step */
  const float decay = 1.0 - sc[0] * sc[4], omb1 = 1.0 - sc[1], b2 = sc[2], omb2 = 1.0 - sc[2], eps = sc[3];
  const float step_size = sc[0] / (1.0 - pow(sc[1], sc[5])), bc2_sqrt = sqrt(1.0 - pow(sc[2], sc[5]));
#pragma omp parallel for simd num_threads(threads) schedule(static)
  for (int64_t i = 0; i < N; i++) {{
    const float gi = g[i], mi = m[i] + omb1 * (gi - m[i]), vi = b2 * v[i] + omb2 * (gi * gi);
    m[i] = mi; v[i] = vi;
    p[i] = p[i] * decay - step_size * (mi / (sqrtf(vi) / bc2_sqrt + eps));
  }}
}}

void vjp_io(int64_t N, const float* restrict w, const float* restrict g_old, {const_states},
            double* restrict out, int threads) {{
  const int64_t chunks = (N + CHUNK - 1) / CHUNK;
  double part[MAX_THREADS][{S}];
  int used = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
#pragma omp parallel num_threads(threads)
  {{
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    double acc[{S}] = {{0}};
    for (int64_t c = chunks * tid / nt; c < chunks * (tid + 1) / nt; c++) {{
      const int64_t end = (c + 1) * CHUNK < N ? (c + 1) * CHUNK : N;
      float {zero};
#pragma omp simd reduction(+:{sums})
      for (int64_t i = c * CHUNK; i < end; i++) {{
        const float wi = w[i];
        a0 += wi * (s0[i] + g_old[i]); {body_sums}
      }}
      {add_chunk}
    }}
    for (int k = 0; k < {S}; k++) part[tid][k] = acc[k];
    if (tid == 0) used = nt;
  }}
  for (int k = 0; k < {S}; k++) {{
    out[k] = 0;
    for (int t = 0; t < used; t++) out[k] += part[t][k];
  }}
}}

void rule_io(int64_t N, float* restrict x, const float* restrict g, {states}, int threads) {{
#pragma omp parallel for simd num_threads(threads) schedule(static)
  for (int64_t i = 0; i < N; i++) {{
    const float gi = g[i];
    {ema}
    x[i] = x[i] + ({total}) * -1e-3f;
  }}
}}

void hyper_io(int64_t N, float* restrict x, const float* restrict g, const float* restrict g_old, {states},
              double* restrict out, int threads) {{
  vjp_io(N, g, g_old, {names}, out, threads);
  rule_io(N, x, g, {names}, threads);
}}
"""


@functools.lru_cache(maxsize=None)
def _library(S: int) -> ctypes.CDLL:
    from hypergrad.native import build_library
    # the MADA kernels' flags: among them -ffp-contract=off, no fused multiply-adds (each operation rounds
    # as torch's elementwise ops do, so ``adamw`` can be checked against torch.optim.AdamW)
    lib = build_library(_source(S), f"traffic_s{S}")
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name, pointers in (("adamw", 5), ("vjp_io", S + 3), ("rule_io", S + 2), ("hyper_io", S + 4)):
        fn = getattr(lib, name)
        fn.argtypes = [i64] + [ptr] * pointers + [i32]
        fn.restype = None
    return lib


class TrafficLoops:
    """The loops for ``states`` state buffers (see the module docstring), on contiguous float32 CPU
    tensors of one size, with ``torch.get_num_threads()`` threads at each call (or ``threads``).
    Building needs a C compiler (``hypergrad.native.build_library``: ``RuntimeError`` without one)."""

    def __init__(self, states: int, threads: Optional[int] = None):
        if not isinstance(states, int) or isinstance(states, bool) or not 1 <= states <= 32:
            raise ValueError(f"states must be an int in [1, 32], got {states!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.states, self.threads = states, threads
        self._lib = _library(states)

    def _args(self, tensors: Sequence[Tensor], what: str):
        n = tensors[0].numel()
        for t in tensors:
            if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != n:
                raise ValueError(f"{what}: every tensor must be a contiguous float32 CPU tensor of {n} elements, got "
                                 f"{t.dtype} on {t.device}, {t.numel()} elements, contiguous={t.is_contiguous()}")
        return [n, *(t.data_ptr() for t in tensors)]

    def _states(self, states: Sequence[Tensor], what: str) -> list:
        if len(states) != self.states:
            raise ValueError(f"{what}: expected {self.states} state buffers, got {len(states)}")
        return list(states)

    def _nthreads(self) -> int:
        return torch.get_num_threads() if self.threads is None else self.threads

    def adamw(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float, step: int) -> None:
        """One AdamW update of ``p``, ``m``, ``v`` in place (``step``: the step count after it, from 1)."""
        sc = torch.tensor([lr, beta1, beta2, eps, weight_decay, float(step)], dtype=torch.float64)
        self._lib.adamw(*self._args([p, g, m, v], "adamw"), sc.data_ptr(), self._nthreads())

    def vjp_io(self, w: Tensor, g_old: Tensor, states: Sequence[Tensor]) -> Tensor:
        """The S sums (float64): ``sum w (s_0 + g_old)``, then ``sum w s_k`` for k >= 1."""
        out = torch.empty(self.states, dtype=torch.float64)
        self._lib.vjp_io(*self._args([w, g_old, *self._states(states, "vjp_io")], "vjp_io"), out.data_ptr(),
                         self._nthreads())
        return out

    def rule_io(self, x: Tensor, g: Tensor, states: Sequence[Tensor]) -> None:
        """``s_k <- 0.9 s_k + 0.1 g`` for each state, then ``x <- x + (s_0 + ... + s_{S-1}) * -1e-3``, in place."""
        self._lib.rule_io(*self._args([x, g, *self._states(states, "rule_io")], "rule_io"), self._nthreads())

    def hyper_io(self, x: Tensor, g: Tensor, g_old: Tensor, states: Sequence[Tensor]) -> Tensor:
        """``vjp_io(g, g_old, states)`` (returned), then ``rule_io(x, g, states)``."""
        out = torch.empty(self.states, dtype=torch.float64)
        self._lib.hyper_io(*self._args([x, g, g_old, *self._states(states, "hyper_io")], "hyper_io"),
                           out.data_ptr(), self._nthreads())
        return out
