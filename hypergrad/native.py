"""Hand-written CPU kernels for MADA's fused hyper-learning step: the partial hypergradient
(hand-derived) and the update that advances past the recorded one.

The fused hyper-learning step (``hypergrad.fused``) is two loops over every parameter: the vjp of
the recorded update at the new gradient, ``g_{t+1}^T dDelta_t/dq`` (a reduction), and the update
that first advances the buffers past the recorded update. The generic path traces both from the
family's expression and compiles them with Inductor; on a CPU the vjp is bound by its arithmetic,
not by memory (docs/performance.md, table g). For the flagship family both are short enough to
write by hand. The partial hypergradient, with ``w = g_{t+1}``, ``a = -lr w`` and the state
*before* the recorded update (``m, n, v_bar, v_tilde, lion_m, g_prev``) and its gradient ``g``::

    forward (MADA, optimizers.rules.mada)            reverse (cotangent of each quantity)
    d    = g - g_prev                                  A_     = a gamma r            (d num)
    m'   = b1 m + (1-b1) g                             den_   = -A_ A                (d den)
    n'   = b3 n + (1-b3) d                             v_     = den_ / (2 sqrt(v/bc2) bc2), 0 where v = 0
    G    = (g + b3 d)^2,  s = sign(G - v_bar)          vb_    = v_ (rho + (1-rho)/t)
    T    = c G + (1-c)(v_bar + G s)                    T_     = vb_ (1-b2)
    vb'  = b2 v_bar + (1-b2) T                         G_     = T_ (c + (1-c) s)
    vt'  = (vb' + (t-1) v_tilde) / t
    v    = rho vb' + (1-rho) vt'                       dL/dgamma = sum a (A - sign(u))
    num  = m'/bc1 + b3 n'                              dL/drho   = sum v_ (vb' - vt')
    r    = 1 / (sqrt(v/bc2) + eps),  A = num r         dL/dc     = sum T_ (G - v_bar - G s)
    u    = b1L lion_m + (1-b1L) g                      dL/db3    = sum G_ 2 (g + b3 d) d + A_ (n' + b3 (n - d))
    Delta = -lr (gamma A + (1-gamma) sign(u) + wd x)   dL/db1    = sum A_ (m - g)/bc1 + sum(A_ m') t b1^(t-1)/bc1^2
                                                       dL/db2    = sum vb_ (v_bar - T) + sum(v_ v) t b2^(t-1)/bc2

(bc1 = 1 - b1^t, bc2 = 1 - b2^t; sign' = 0; the square root's derivative is 0 where v = 0, as
``optimizers.expr._SafeSqrt`` defines it). ``x`` does not depend on the coefficients, so the weight
decay drops out (``decoupled`` and ``l2``, whose record holds the effective gradient). The update
after a recorded one (``MadaUpdate``, decoupled decay) is the left column twice, with the recorded
step's coefficients and then this step's, and ``x += Delta``; recording (the rotating variant that
the library runs at every step after the first when every step learns), the buffers keep the
advanced state and g_prev's buffer takes the new gradient; otherwise (a learning step of
``hyper_interval > 1``) they take the state after this update.

Why by hand: Inductor's loop for the traced vjp is ~150 instructions per 16 elements, with 14
running sums kept in memory (its cascade-summation helpers); this loop keeps 10 sums in registers,
leaves the factors common to all elements (``-lr gamma``, ``1/(2 bc2)``...) out of them, and runs
about half the instructions. Measured side by side with fused AdamW and with the compiled kernels
they replace in docs/performance.md, table (g) (``python -m experiments.bench_step --all``); on the
2-core AMD EPYC VM, one thread, 10.5M float32 elements, the vjp took about 60% of the compiled one's
time and the update about 80%; the vjp then cost about what a loop with its reads and next to no
arithmetic costs (table g's *vjp_io*), so less arithmetic would gain little there.

Precision: the update computes every quantity in the order of the DSL's expression (the one-minus
coefficients and other scalars in float64, then rounded to the tensors' dtype, as the compiled
kernels do): in float32 it equals the compiled kernel bit for bit. The vjp sums each 4096-element
chunk in the tensors' dtype (vectorized) and the chunks in float64; threads (OpenMP, torch's thread
count) take contiguous ranges and their sums are added in thread order, so a result depends only on
the data and the thread count. Float64 tensors run the same loops in float64: tests/test_native.py
checks the vjp against ``torch.func.vjp`` of the family's own update (the DSL's, not this
derivation) and the update against its eager definition.

The library is compiled on first use with the system C compiler (``CC``, else ``gcc``/``cc``) into
a cache directory (``HYPERGRAD_CACHE_DIR``, else ``<tmp>/hypergrad-<uid>``; it must belong to this user
and be writable by no one else, since the library is loaded from it), keyed by the source,
the flags, the compiler and the CPU (``-march=native``). Without a compiler, or if the build fails,
a warning is logged once and the fused path uses the compiled kernels.

Threads after ``fork``: the kernels run in the OpenMP runtime that torch has loaded (its libgomp),
so a forked child behaves as with torch's own parallel ops. A child that uses several threads after
the parent did hangs in torch's ops and in these alike (GNU OpenMP's thread pool does not survive
``fork``); with ``torch.set_num_threads(1)`` in the child, as DataLoader workers have, both run.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from optimizers import Family

log = logging.getLogger(__name__)

__all__ = ["mada_kernels_available", "is_mada", "MadaPartial", "MadaUpdate", "MADA_COEFFICIENTS", "build_library"]

# The order of the kernel's outputs (and of q in it): the six learnable coefficients of rules.mada.
MADA_COEFFICIENTS = ("beta1", "beta2", "beta3", "c", "rho", "gamma")
# The scalars the kernel reads, in this order (float64): the six, then the fixed ones and the step.
_SCALARS = MADA_COEFFICIENTS + ("beta1_lion", "eps", "lr", "t")

_KERNEL = r"""
/* See hypergrad/native.py for the equations. scalar_t: float or double. The one-minus coefficients
   and the other scalars are computed in double and rounded once, as the compiled kernels do. */
#define SIGN(x) ((scalar_t)((x) > 0) - (scalar_t)((x) < 0))

/* MADA's moments after one step, the part of the update that the vjp, the advance past the recorded
   update and this update share (with the coefficients of their step) */
typedef struct { scalar_t b1, omb1, b2, omb2, b3, omb3, c, omc, t_minus_1, inv_t; } coefs_SUFFIX;
typedef struct { scalar_t d, m, n, g_hat, G, s, yogi, target, v_bar, v_tilde; } moments_SUFFIX;

static coefs_SUFFIX coefs_SUFFIX_of(double b1, double b2, double b3, double c, double t) {
  const coefs_SUFFIX k = {b1, 1.0 - b1, b2, 1.0 - b2, b3, 1.0 - b3, c, 1.0 - c, t - 1.0, 1.0 / t};
  return k;
}

static inline moments_SUFFIX moments_SUFFIX_of(const coefs_SUFFIX k, scalar_t g, scalar_t g_prev, scalar_t m,
                                               scalar_t n, scalar_t v_bar, scalar_t v_tilde) {
  moments_SUFFIX a;
  a.d = g - g_prev;
  a.m = k.b1 * m + k.omb1 * g;
  a.n = k.b3 * n + k.omb3 * a.d;
  a.g_hat = g + k.b3 * a.d;
  a.G = a.g_hat * a.g_hat;
  a.s = SIGN(a.G - v_bar);
  a.yogi = v_bar + a.G * a.s;
  a.target = k.c * a.G + k.omc * a.yogi;
  a.v_bar = k.b2 * v_bar + k.omb2 * a.target;
  a.v_tilde = (a.v_bar + k.t_minus_1 * v_tilde) * k.inv_t;
  return a;
}

void mada_partial_SUFFIX(int64_t N, const scalar_t* restrict g, const scalar_t* restrict g_prev,
                         const scalar_t* restrict m, const scalar_t* restrict n, const scalar_t* restrict lion_m,
                         const scalar_t* restrict v_bar, const scalar_t* restrict v_tilde,
                         const scalar_t* restrict w, const double* restrict sc, double* restrict out,
                         int threads) {
  /* sc: beta1, beta2, beta3, c, rho, gamma, beta1_lion, eps, lr, t. Per element, the sums leave out
     the factors common to all elements (-lr gamma in A_, 1/(2 bc2) in v_, ...): they scale the
     sums at the end. W = w r stands for A_ / (-lr gamma), V = W A / sqrt(v/bc2) for v_ / (lr gamma / (2 bc2)). */
  const double t = sc[9], bc1 = 1.0 - pow(sc[0], t), bc2 = 1.0 - pow(sc[1], t);
  const coefs_SUFFIX k = coefs_SUFFIX_of(sc[0], sc[1], sc[2], sc[3], t);
  const scalar_t b3 = sc[2], c = sc[3], omc = 1.0 - sc[3], rho = sc[4], omrho = 1.0 - sc[4];
  const scalar_t b1L = sc[6], omb1L = 1.0 - sc[6], eps = sc[7];
  const scalar_t inv_bc1 = 1.0 / bc1, inv_bc2 = 1.0 / bc2, one = 1;
  const int64_t chunks = (N + HG_CHUNK - 1) / HG_CHUNK;
  double part[HG_MAX_THREADS][HG_SUMS];
  int used = 1;
  if (threads < 1 || N < HG_PARALLEL_MIN) threads = 1;
  if (threads > HG_MAX_THREADS) threads = HG_MAX_THREADS;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = chunks * tid / nt, hi = chunks * (tid + 1) / nt;
    double acc[HG_SUMS] = {0};
    for (int64_t chunk = lo; chunk < hi; chunk++) {
      const int64_t begin = chunk * HG_CHUNK, end = begin + HG_CHUNK < N ? begin + HG_CHUNK : N;
      scalar_t s_m = 0, s_vb = 0, s_gh = 0, s_n = 0, s_c = 0, s_rho = 0, s_gamma = 0, s_bc1 = 0, s_bc2 = 0, s_w = 0;
#pragma omp simd reduction(+:s_m, s_vb, s_gh, s_n, s_c, s_rho, s_gamma, s_bc1, s_bc2, s_w)
      for (int64_t i = begin; i < end; i++) {
        const scalar_t gi = g[i], mi = m[i], ni = n[i], vbi = v_bar[i], wi = w[i];
        const moments_SUFFIX a = moments_SUFFIX_of(k, gi, g_prev[i], mi, ni, vbi, v_tilde[i]);
        const scalar_t v = rho * a.v_bar + omrho * a.v_tilde;
        const scalar_t root = SQRT(v * inv_bc2), r = one / (root + eps);
        const scalar_t A = (a.m * inv_bc1 + b3 * a.n) * r;
        const scalar_t u = b1L * lion_m[i] + omb1L * gi;
        const scalar_t W = wi * r, V = root > 0 ? W * A / root : 0;
        s_gamma += wi * (A - SIGN(u));
        s_rho += V * (a.v_bar - a.v_tilde);
        s_c += V * (a.G - a.yogi);
        s_vb += V * (vbi - a.target);
        s_gh += V * (c + omc * a.s) * a.g_hat * a.d;
        s_n += W * (a.n + b3 * (ni - a.d));
        s_m += W * (mi - gi);
        s_bc1 += W * a.m;
        s_bc2 += V * v;
        s_w += wi;
      }
      acc[0] += s_m; acc[1] += s_vb; acc[2] += s_gh; acc[3] += s_n; acc[4] += s_c; acc[5] += s_rho;
      acc[6] += s_gamma; acc[7] += s_bc1; acc[8] += s_bc2; acc[9] += s_w;
    }
    for (int k = 0; k < HG_SUMS; k++) part[tid][k] = acc[k];
    if (tid == 0) used = nt;
  }
  double S[HG_SUMS] = {0};
  for (int tid = 0; tid < used; tid++)
    for (int k = 0; k < HG_SUMS; k++) S[k] += part[tid][k];
  /* A_ = kA W, v_ = kV V; vb_ = v_ (rho + (1-rho)/t), T_ = vb_ (1-b2), G_ = T_ (c + (1-c) s); and the
     bias corrections' share: d(1/bc1)/db1 = t b1^(t-1) / bc1^2, d(1/bc2)/db2 = t b2^(t-1) / bc2^2
     (through v/bc2: sum(v_ v) bc2 d(1/bc2)/db2) */
  const double kA = -sc[8] * sc[5], kV = -kA * 0.5 / bc2, vb_weight = sc[4] + (1.0 - sc[4]) / t;
  const double kT = kV * vb_weight * (1.0 - sc[1]);
  out[0] = kA * (S[0] / bc1 + S[7] * t * pow(sc[0], t - 1.0) / (bc1 * bc1));
  out[1] = kV * (vb_weight * S[1] + S[8] * t * pow(sc[1], t - 1.0) / bc2);
  out[2] = 2.0 * kT * S[2] + kA * S[3];
  out[3] = kT * S[4];
  out[4] = kV * S[5];
  out[5] = -sc[8] * S[6];
  out[6] = S[9];
}

void mada_update_SUFFIX(int64_t N, scalar_t* restrict x, const scalar_t* restrict g,
                        const scalar_t* restrict g_last, scalar_t* restrict g_prev, scalar_t* restrict m,
                        scalar_t* restrict n, scalar_t* restrict lion_m, scalar_t* restrict v_bar,
                        scalar_t* restrict v_tilde, const double* restrict old, const double* restrict now,
                        int record, int threads) {
  /* old (the recorded update): beta1, beta2, beta3, c, beta2_lion, t;
     now: beta1, beta2, beta3, c, rho, gamma, beta1_lion, eps, lr, weight_decay, t, beta2_lion.
     record: the buffers keep the advanced state (this update is recorded: g goes to g_prev's buffer as
     the new record, and the caller gives g_prev's role to g_last's buffer); else they take the state
     after this update (whose g_prev is g: the same write). */
  const coefs_SUFFIX k_old = coefs_SUFFIX_of(old[0], old[1], old[2], old[3], old[5]);
  const coefs_SUFFIX k = coefs_SUFFIX_of(now[0], now[1], now[2], now[3], now[10]);
  const scalar_t b2L = old[4], omb2L = 1.0 - old[4], b3 = now[2], rho = now[4], omrho = 1.0 - now[4];
  const scalar_t gamma = now[5], omgamma = 1.0 - now[5], b1L = now[6], omb1L = 1.0 - now[6], eps = now[7];
  const scalar_t neg_lr = -now[8], wd = now[9], b2L_now = now[11], omb2L_now = 1.0 - now[11], one = 1;
  const scalar_t inv_bc1 = 1.0 / (1.0 - pow(now[0], now[10])), inv_bc2 = 1.0 / (1.0 - pow(now[1], now[10]));
  if (threads < 1 || N < HG_PARALLEL_MIN) threads = 1;
#pragma omp parallel for simd num_threads(threads) schedule(static)
  for (int64_t i = 0; i < N; i++) {
    const scalar_t gl = g_last[i], gi = g[i];
    /* advance past the recorded update (its gradient g_last), then this update from the advanced
       state, whose g_prev is g_last */
    const moments_SUFFIX a = moments_SUFFIX_of(k_old, gl, g_prev[i], m[i], n[i], v_bar[i], v_tilde[i]);
    const scalar_t lion = b2L * lion_m[i] + omb2L * gl;
    const moments_SUFFIX b = moments_SUFFIX_of(k, gi, gl, a.m, a.n, a.v_bar, a.v_tilde);
    const scalar_t v = rho * b.v_bar + omrho * b.v_tilde;
    const scalar_t A = (b.m * inv_bc1 + b3 * b.n) * (one / (SQRT(v * inv_bc2) + eps));
    const scalar_t u = b1L * lion + omb1L * gi, direction = gamma * A + omgamma * SIGN(u);
    const scalar_t xi = x[i];
    x[i] = xi + neg_lr * (direction + wd * xi);
    if (record) {
      m[i] = a.m; n[i] = a.n; lion_m[i] = lion; v_bar[i] = a.v_bar; v_tilde[i] = a.v_tilde;
    } else {
      m[i] = b.m; n[i] = b.n; lion_m[i] = b2L_now * lion + omb2L_now * gi; v_bar[i] = b.v_bar; v_tilde[i] = b.v_tilde;
    }
    g_prev[i] = gi;
  }
}
#undef SIGN
"""

_SOURCE = ("#include <math.h>\n#include <stdint.h>\n#include <omp.h>\n"
           "#define HG_CHUNK 4096\n#define HG_SUMS 10\n#define HG_MAX_THREADS 256\n"
           "#define HG_PARALLEL_MIN 65536\n"
           + _KERNEL.replace("scalar_t", "float").replace("SUFFIX", "f32").replace("SQRT", "sqrtf")
           + _KERNEL.replace("scalar_t", "double").replace("SUFFIX", "f64").replace("SQRT", "sqrt"))
# -fno-math-errno: a vectorized sqrt (the NaN of a negative argument is kept, only errno is not set);
# -ffp-contract=off: no fused multiply-adds, every operation rounds as torch's elementwise ops do.
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-std=gnu11", "-fPIC", "-shared")

_lock = threading.Lock()
_library: Optional[object] = None  # the loaded ctypes library, False once a build failed


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    return cc if cc else (shutil.which("gcc") or shutil.which("cc"))


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), platform.processor(), *lines])


def build_library(source: str, stem: str, flags: Sequence[str] = _FLAGS) -> ctypes.CDLL:
    """Compile C ``source`` into a shared library and load it (ctypes), or load the one built before.

    The library is cached in ``HYPERGRAD_CACHE_DIR`` (else ``<tmp>/hypergrad-<uid>``) under
    ``<stem>_<key>.so``, keyed by the source, the flags, the compiler's version and the CPU (for
    ``-march=native``). The directory must belong to this user and be writable by no one else (a
    library is loaded from it: another user able to write there could plant one). Raises
    ``RuntimeError`` without a compiler, for such a directory, or if the build fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([source, " ".join(flags), version, _cpu_identity()]).encode()).hexdigest()[:24]
    cache = os.environ.get("HYPERGRAD_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"hypergrad-{os.getuid()}")
    os.makedirs(cache, mode=0o700, exist_ok=True)
    info = os.stat(cache)
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"the cache directory {cache} must belong to this user and be writable by no one else "
                           f"(owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}); set HYPERGRAD_CACHE_DIR")
    path = os.path.join(cache, f"{stem}_{key}.so")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, lib = os.path.join(tmp, f"{stem}.c"), os.path.join(tmp, f"{stem}.so")
            with open(src, "w") as f:
                f.write(source)
            done = subprocess.run([cc, *flags, src, "-o", lib, "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(lib, path)  # atomic: a concurrent process sees the whole library or none
    return ctypes.CDLL(path)


def _build() -> ctypes.CDLL:
    library = build_library(_SOURCE, "mada_kernels")
    for suffix in ("f32", "f64"):  # (n, the buffers..., the scalars..., threads)
        for name, pointers, ints in (("mada_partial", 10, 1), ("mada_update", 11, 2)):
            fn = getattr(library, f"{name}_{suffix}")
            fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * pointers + [ctypes.c_int] * ints
            fn.restype = None
    return library


def _load():
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                try:
                    _library = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    log.warning("hypergrad.native: the MADA kernels are unavailable (%s); the fused path uses the "
                                "compiled kernels", exc)
                    _library = False
    return _library or None


def mada_kernels_available() -> bool:
    """Whether the native kernels could be built and loaded on this machine (builds them if needed)."""
    return _load() is not None


@functools.lru_cache(maxsize=None)
def _mada_structure() -> Tuple:
    from optimizers.rules import mada
    return _structure(mada())


def _structure(family: Family) -> Tuple:
    """The family's update as data: its expression and its states' definitions (their ``repr`` spells
    the whole tree), its coefficients and the constants substituted into it."""
    return (repr(family.direction), tuple((s.name, repr(s.definition)) for s in family.states),
            tuple(family.coefficients), tuple(sorted((k, repr(v)) for k, v in family.fixed.items())))


def is_mada(family: Family) -> bool:
    """Whether ``family`` computes exactly ``optimizers.rules.mada()``'s update (its name aside): the
    kernel's derivation holds for that expression only."""
    return _structure(family) == _mada_structure()


class _NativeCall:
    """What the two kernels' Python sides share: the library's function per dtype, the check that a
    call's tensors are ones the kernel takes, and the generic kernel for those it does not (made by
    ``fallback()`` when first needed). ``threads``: OpenMP threads of a call (default:
    ``torch.get_num_threads()`` at the call)."""

    _STATES = ("g_prev", "m", "n", "lion_m", "v_bar", "v_tilde")  # the kernels' buffer order

    def __init__(self, kernel: str, names: Sequence[str], fallback: Callable[[], object], threads: Optional[int]):
        library = _load()
        if library is None:
            raise RuntimeError("the native MADA kernels are unavailable (see the warning logged)")
        self._fns = {torch.float32: getattr(library, f"{kernel}_f32"), torch.float64: getattr(library, f"{kernel}_f64")}
        self._order = [list(names).index(k) for k in self._STATES]
        self._fallback, self._fallback_made, self.threads = fallback, None, threads

    def _function(self, tensors: Sequence[Tensor]):
        """The kernel for these tensors, or None if it does not take them: all contiguous CPU tensors of
        one size and dtype, float32 or float64."""
        first = tensors[0]
        fn = self._fns.get(first.dtype)
        if fn is None or any(x.device.type != "cpu" or x.dtype != first.dtype or x.numel() != first.numel()
                             or not x.is_contiguous() for x in tensors):
            return None
        return fn

    def _generic(self):
        if self._fallback_made is None:
            self._fallback_made = self._fallback()
        return self._fallback_made

    def _threads(self) -> int:
        return torch.get_num_threads() if self.threads is None else self.threads


def _float64(values: Sequence[Tensor]) -> Tensor:
    return torch.stack([v.detach().to("cpu", torch.float64) for v in values])


class MadaPartial(_NativeCall):
    """``HyperKernels.partial_for`` for MADA: ``(g_old, old_states, cotangent, q) -> (partial, sum)``
    with the scalars of one record bound (``fixed``: the hyperparameters not learned, ``t``: the
    recorded update's step). ``partial`` (float64) is in the order of ``learn``, ``sum`` is the sum of
    the cotangent (the non-finite check of the new gradient). A call whose tensors the kernel does
    not take (not contiguous, not on the CPU, another dtype than float32/float64, different sizes)
    goes to the generic kernel with the same scalars bound (``fallback()``)."""

    def __init__(self, names: Sequence[str], learn: Sequence[str], fixed: Mapping[str, Tensor], t: Tensor,
                 fallback: Callable[[], object], threads: Optional[int] = None):
        super().__init__("mada_partial", names, fallback, threads)
        missing = [k for k in _SCALARS[:-1] if k not in fixed and k not in learn]
        if missing or not set(learn) <= set(MADA_COEFFICIENTS):
            raise ValueError(f"MadaPartial: learn={list(learn)} must be among {MADA_COEFFICIENTS} and the "
                             f"hyperparameters {missing} must be given in fixed")
        self._learn_index = torch.tensor([MADA_COEFFICIENTS.index(k) for k in learn])
        self._canonical = tuple(learn) == MADA_COEFFICIENTS
        # the scalar vector: the learned entries come from q (per call), the others now
        self._base = _float64([t if k == "t" else fixed[k] if k not in learn else torch.zeros(())
                               for k in _SCALARS])
        self._last_q: Optional[Tuple[Tensor, int]] = None
        self._scalars: Optional[Tensor] = None

    def _scalars_for(self, q: Tensor) -> Tensor:
        """The scalar vector with ``q``'s values: made once per coefficient set (the segments of a set
        pass the same ``q``) and again if ``q`` was written in place since."""
        if self._last_q is None or self._last_q[0] is not q or self._last_q[1] != q._version:
            sc = self._base.clone()
            sc.index_copy_(0, self._learn_index, q.detach().to("cpu", torch.float64))
            self._last_q, self._scalars = (q, q._version), sc
        return self._scalars

    def __call__(self, g_old: Tensor, old_states: Sequence[Tensor], cotangent: Tensor, q: Tensor):
        return self.prepare(g_old, old_states, cotangent, q)()

    def prepare(self, g_old: Tensor, old_states: Sequence[Tensor], cotangent: Tensor, q: Tensor) -> Callable:
        """The call to make later (``SegmentPlan``: the calls of a step are prepared, then made back to back)."""
        tensors = [g_old, *(old_states[i] for i in self._order), cotangent]
        fn = self._function(tensors)
        if fn is None or q.device.type != "cpu":
            return self._generic().prepare(g_old, old_states, cotangent, q)
        sc = self._scalars_for(q)
        args = (g_old.numel(), *(x.data_ptr() for x in tensors), sc.data_ptr())
        return functools.partial(self._run, fn, args, self._threads(), (tensors, sc))  # (kept alive until the call)

    def _run(self, fn, args, threads, keep):
        out = torch.empty(7, dtype=torch.float64)
        fn(*args, out.data_ptr(), threads)
        partial = out[:6] if self._canonical else out[self._learn_index]
        return partial, out[6]


class MadaUpdate(_NativeCall):
    """``HyperKernels.update_for`` for MADA's update after a recorded one, with decoupled weight decay:
    ``(x, g, states, g_last, g_store=None) -> None``, in place. The buffers hold the state before the
    recorded update (``last = (h_last, t_last, ...)``, its gradient ``g_last``); they are advanced past
    it and ``x`` takes this update (``h``, ``t``). ``record`` (the rotating update, every step after
    the first when every step learns): the buffers keep the advanced state and g_prev's buffer receives
    ``g``, the new record (the caller gives g_prev's role to ``g_last``'s buffer); else (the learning
    step of ``hyper_interval > 1``) they take the state after this update. Other calls go to
    ``fallback()``."""

    _NOW = ("beta1", "beta2", "beta3", "c", "rho", "gamma", "beta1_lion", "eps", "lr", "weight_decay")
    _OLD = ("beta1", "beta2", "beta3", "c", "beta2_lion")

    def __init__(self, names: Sequence[str], h: Mapping[str, Tensor], t: Tensor, h_last: Mapping[str, Tensor],
                 t_last: Tensor, record: bool, fallback: Callable[[], object], threads: Optional[int] = None):
        super().__init__("mada_update", names, fallback, threads)
        self._now = _float64([h[k] for k in self._NOW] + [t, h["beta2_lion"]])
        self._old = _float64([h_last[k] for k in self._OLD] + [t_last])
        self.record = bool(record)

    def __call__(self, x: Tensor, g: Tensor, states: Sequence[Tensor], g_last: Tensor, g_store: Optional[Tensor] = None):
        self.prepare(x, g, states, g_last, g_store)()

    def prepare(self, x: Tensor, g: Tensor, states: Sequence[Tensor], g_last: Tensor,
                g_store: Optional[Tensor] = None) -> Callable:
        if g_last is None or g_store is not None:
            raise ValueError("MadaUpdate (after a recorded update): g_last is required and g_store must be None")
        tensors = [x, g, g_last, *(states[i] for i in self._order)]
        fn = self._function(tensors)
        if fn is None:
            return self._generic().prepare(x, g, states, g_last, g_store)
        args = (x.numel(), *(b.data_ptr() for b in tensors), self._old.data_ptr(), self._now.data_ptr(), int(self.record))
        return functools.partial(self._run, fn, args, self._threads(), tensors)

    def _run(self, fn, args, threads, tensors):
        fn(*args, threads)
        # what the compiled kernel's caller would see: the written tensors' versions move on
        torch._C._increment_version([tensors[0], *tensors[3:]])
