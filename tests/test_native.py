"""The hand-written CPU kernel for MADA's partial hypergradient (``hypergrad.native``).

Oracles: ``torch.func.vjp`` of the family's own update (``displacement``, the DSL's expression, not
the kernel's hand derivation) in float64, and the generic compiled kernel it replaces."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hypergrad as H
import optimizers as O
from hypergrad import native as N
from hypergrad.fused import HyperKernels
from hypergrad.gradcheck import MADA_INTERIOR, builtin_problem
from optimizers.functional import displacement
from optimizers.rules import MADA_VERTICES

needs_kernel = pytest.mark.skipif(not N.mada_kernels_available(), reason="no C compiler: the native kernel is not built")

ALL = N.MADA_COEFFICIENTS


def _problem(n, dtype=torch.float64, seed=0, point=None):
    """Recorded inputs of one MADA update (state before it, its gradient), the next gradient and the
    scalars, with zeros where the square root's derivative takes its zero branch."""
    family = O.get_rule("mada")
    gen = torch.Generator().manual_seed(seed)
    g_old, cot = (torch.randn(n, generator=gen, dtype=torch.float64) * 1e-2 for _ in range(2))
    state = {k: torch.randn(n, generator=gen, dtype=torch.float64) * 1e-2 for k in family.state_names}
    for k in ("v_bar", "v_tilde"):
        state[k] = state[k].square()
    for k in ("v_bar", "v_tilde", "g_prev"):
        state[k][:7] = 0.0
    g_old[:7] = 0.0
    point = {**MADA_INTERIOR, **(point or {})}
    f64 = dict(dtype=torch.float64)
    fixed = {k: torch.tensor(v, **f64) for k, v in
             dict(beta1_lion=0.95, beta2_lion=0.98, eps=1e-8, lr=1e-2, weight_decay=0.1).items()}
    coefs = {k: torch.tensor(float(point[k]), **f64) for k in ALL}
    cast = lambda x: x.to(dtype)  # noqa: E731
    return family, cast(g_old), {k: cast(v) for k, v in state.items()}, cast(cot), coefs, fixed, torch.tensor(6.0, **f64)


def _reference(family, g_old, state, cot, coefs, fixed, t, learn=ALL):
    """``cot^T dDelta/dq`` by ``torch.func.vjp`` of ``displacement``, in float64."""
    f64 = lambda x: x.to(torch.float64)  # noqa: E731
    g_old, cot, state = f64(g_old), f64(cot), {k: f64(v) for k, v in state.items()}
    q = torch.stack([coefs[k] for k in learn])

    def delta(qv):
        h = {**fixed, **coefs, **{k: qv[i] for i, k in enumerate(learn)}}
        return displacement(family, g_old, state, torch.zeros((), dtype=torch.float64), h, t, "decoupled")[0]

    _, vjp = torch.func.vjp(delta, q)
    return vjp(cot)[0], q


def _kernel(family, learn, coefs, fixed, t, native=True, threads=None):
    kern = HyperKernels(family, "decoupled", learn, native=native)
    fixed = {**fixed, **{k: v for k, v in coefs.items() if k not in learn}}
    fn = kern.partial_for(fixed, t)
    if native:
        assert isinstance(fn, N.MadaPartial)
        fn.threads = threads
    return fn


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("point", ["interior", "adam", "lion", "yogi"])
def test_native_kernel_equals_torch_func_vjp_in_float64(point, threads):
    """float64, 70001 elements (above the size that uses threads; 17 chunks of 4096 and a tail):
    equal to the vjp of the DSL's update to rounding, at a point inside the family and at vertices
    (beta3 = 0, c = 1, gamma = 0...)."""
    family, g_old, state, cot, coefs, fixed, t = _problem(70001, point=MADA_VERTICES.get(point))
    expected, q = _reference(family, g_old, state, cot, coefs, fixed, t)
    fn = _kernel(family, ALL, coefs, fixed, t, threads=threads)
    partial, total = fn(g_old, [state[k] for k in family.state_names], cot, q)
    assert partial.dtype == torch.float64 and partial.shape == (6,)
    assert expected.abs().max() > 0
    torch.testing.assert_close(partial, expected, rtol=1e-11, atol=1e-13 * expected.abs().max().item())
    torch.testing.assert_close(total, cot.sum(), rtol=1e-12, atol=1e-14)


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_with_one_thread_runs_the_kernel_after_the_parent_used_two():
    """The module docstring's claim about fork: after the parent ran the kernel with two OpenMP
    threads, a child with ``torch.set_num_threads(1)`` (what DataLoader workers set) runs it and gets
    the parent's single-thread result bit for bit. (A child that uses several threads hangs, in torch's
    own parallel ops as in these: not tested.)"""
    family, g_old, state, cot, coefs, fixed, t = _problem(70001)
    q = torch.stack([coefs[k] for k in ALL])
    args = (g_old, [state[k] for k in family.state_names], cot, q)
    fn = _kernel(family, ALL, coefs, fixed, t, threads=2)
    fn(*args)  # the parent's OpenMP pool now has two threads
    fn.threads = None  # torch's thread count at the call
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = fn(*args)[0]
    finally:
        torch.set_num_threads(torch_threads)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            import signal
            signal.alarm(60)  # a hang ends the child, and the parent sees it
            torch.set_num_threads(1)
            os.write(write, fn(*args)[0].numpy().tobytes())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    got = torch.frombuffer(bytearray(data), dtype=torch.float64)
    assert torch.equal(got, expected)


@needs_kernel
def test_native_kernel_learning_a_subset_returns_it_in_the_order_of_learn():
    family, g_old, state, cot, coefs, fixed, t = _problem(5003, seed=1)
    learn = ("gamma", "beta2", "c")
    expected, q = _reference(family, g_old, state, cot, coefs, fixed, t, learn)
    fn = _kernel(family, learn, coefs, fixed, t)
    partial, _ = fn(g_old, [state[k] for k in family.state_names], cot, q)
    torch.testing.assert_close(partial, expected, rtol=1e-11, atol=1e-13 * expected.abs().max().item())
    # q written in place between calls: the next call reads its new values
    coefs = {**coefs, "gamma": torch.tensor(0.25, dtype=torch.float64)}
    expected, q_new = _reference(family, g_old, state, cot, coefs, fixed, t, learn)
    q.copy_(q_new)
    partial, _ = fn(g_old, [state[k] for k in family.state_names], cot, q)
    torch.testing.assert_close(partial, expected, rtol=1e-11, atol=1e-13 * expected.abs().max().item())


@needs_kernel
def test_native_kernel_float32_is_as_accurate_as_the_compiled_vjp():
    """float32 buffers (the usual case): both kernels sum in float32 per chunk; measured against the
    float64 vjp of the same float32 data, the native kernel's error is at most the compiled one's
    (plus a margin) and small."""
    family, g_old, state, cot, coefs, fixed, t = _problem(300007, dtype=torch.float32, seed=2)
    expected, q = _reference(family, g_old, state, cot, coefs, fixed, t)
    states = [state[k] for k in family.state_names]
    native, total = _kernel(family, ALL, coefs, fixed, t)(g_old, states, cot, q.float())
    generic, generic_total = _kernel(family, ALL, coefs, fixed, t, native=False)(g_old, states, cot, q.float())
    scale = expected.abs()
    err_native = ((native - expected).abs() / scale).max().item()
    err_generic = ((generic.double() - expected).abs() / scale).max().item()
    assert err_native <= 1e-4 and err_native <= 2 * err_generic + 1e-6, (err_native, err_generic)
    torch.testing.assert_close(total, cot.double().sum(), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_strided_or_mixed_inputs_go_to_the_compiled_vjp():
    """A call the kernel does not take (a strided tensor) runs the generic kernel, made then."""
    family, g_old, state, cot, coefs, fixed, t = _problem(2 * 4099, seed=3)
    g_strided = g_old[::2]
    states = [state[k][::2].contiguous() for k in family.state_names]
    cot = cot[::2].contiguous()
    expected, q = _reference(family, g_strided, dict(zip(family.state_names, states)), cot, coefs, fixed, t)
    kern = HyperKernels(family, "decoupled", ALL)
    fn = kern.partial_for({**fixed}, t)
    partial, _ = fn(g_strided, states, cot, q)
    assert len(kern._kernels) == 1  # the generic vjp kernel was built for this call
    torch.testing.assert_close(partial.double(), expected, rtol=1e-11, atol=1e-13 * expected.abs().max().item())
    partial, _ = fn(g_strided.contiguous(), states, cot, q)  # contiguous again: the native kernel
    torch.testing.assert_close(partial, expected, rtol=1e-11, atol=1e-13 * expected.abs().max().item())


def test_only_the_exact_mada_update_gets_the_native_kernel():
    mada = O.get_rule("mada")
    assert N.is_mada(mada) and N.is_mada(mada.with_weight_decay("l2"))
    assert not N.is_mada(mada.at(beta3=0.0))  # a restriction: another expression
    assert not N.is_mada(O.get_rule("adan")) and not N.is_mada(O.get_rule("adam"))
    assert HyperKernels(mada, "decoupled", ALL).native
    assert HyperKernels(mada, "l2", ALL).native
    assert not HyperKernels(mada, "proximal", ALL).native  # its update scales the direction by 1/(1 + lr wd)
    assert not HyperKernels(mada, "decoupled", ALL, native=False).native


@needs_kernel
def test_hyper_optimizer_native_and_compiled_vjp_learn_the_same_coefficients():
    """Whole fused hyper-learning steps (float64): with the native kernel and with the compiled vjp,
    the same hypergradients and coefficients to rounding."""
    runs = {}
    for native in (True, False):
        model, loss_fns = builtin_problem(8, seed=5)
        opt = H.HyperOptimizer(model.parameters(), "mada", lr=1e-2, weight_decay=0.1, fused=True, native=native,
                               warmup=1, **MADA_INTERIOR)
        for loss_fn in loss_fns[:4]:
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
        runs[native] = (opt.hypergradients(), [p.detach().clone() for p in model.parameters()])
    (hg_native, x_native), (hg_generic, x_generic) = runs[True], runs[False]
    assert any(v.abs().max() > 0 for v in hg_native.values())
    for k in hg_native:
        torch.testing.assert_close(hg_native[k], hg_generic[k], rtol=1e-9, atol=1e-15)
    for a, b in zip(x_native, x_generic):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # (the coefficients differ in their last bits)
    with pytest.raises(TypeError, match="native"):
        H.HyperOptimizer(builtin_problem(8, seed=5)[0].parameters(), "mada", fused=True, native="yes")


@pytest.mark.parametrize("why", ["no compiler", "shared cache directory"])
def test_without_a_usable_build_the_fused_path_uses_the_compiled_vjp(tmp_path, why):
    """No compiler (CC names none), or a cache directory others can write into (a library planted there
    would be loaded): a warning, and ``partial_for`` gives the generic kernel."""
    code = textwrap.dedent("""
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        import optimizers as O
        from hypergrad import native as N
        from hypergrad.fused import HyperKernels
        assert not N.mada_kernels_available()
        kern = HyperKernels(O.get_rule("mada"), "decoupled", N.MADA_COEFFICIENTS)
        fixed = {k: torch.tensor(v, dtype=torch.float64) for k, v in
                 dict(beta1_lion=0.95, beta2_lion=0.98, eps=1e-8, lr=1e-2, weight_decay=0.1).items()}
        fn = kern.partial_for(fixed, torch.tensor(2.0, dtype=torch.float64))
        assert not isinstance(fn, N.MadaPartial), fn
        print("generic")
    """)
    env = {**os.environ, "HYPERGRAD_CACHE_DIR": str(tmp_path / "cache")}
    if why == "no compiler":
        env["CC"] = str(tmp_path / "no-such-cc")
    else:
        (tmp_path / "cache").mkdir()
        os.chmod(tmp_path / "cache", 0o777)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generic" in done.stdout
    assert "the MADA kernels are unavailable" in done.stderr
    assert ("writable by no one else" in done.stderr) == (why != "no compiler")
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing built, nothing loaded


def _update_problem(n, dtype, seed=0):
    family = O.get_rule("mada")
    gen = torch.Generator().manual_seed(seed)
    rand = lambda scale=1e-2: torch.randn(n, generator=gen, dtype=torch.float64) * scale  # noqa: E731
    state = {k: rand() for k in family.state_names}
    for k in ("v_bar", "v_tilde"):
        state[k] = state[k].square()
        state[k][:7] = 0.0
    x, g, g_last = rand(1.0), rand(), rand()
    f64 = dict(dtype=torch.float64)
    h = {k: torch.tensor(v, **f64) for k, v in dict(MADA_INTERIOR, beta1_lion=0.95, beta2_lion=0.98, eps=1e-8,
                                                   lr=1e-2, weight_decay=0.1).items()}
    h_last = {**h, "beta1": torch.tensor(0.8, **f64), "c": torch.tensor(0.9, **f64), "beta3": torch.tensor(0.2, **f64)}
    cast = lambda v: v.to(dtype)  # noqa: E731
    return family, cast(x), cast(g), cast(g_last), {k: cast(v) for k, v in state.items()}, h, h_last


@needs_kernel
@pytest.mark.parametrize("record", [True, False], ids=["rotating", "not recording"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_update_after_a_recorded_one_equals_the_compiled_and_the_eager_update(dtype, record):
    """MADA's update after a recorded one (advance past the recorded update, apply this one; recording,
    the buffers keep the advanced state and g_prev's buffer takes the new gradient, else they take the
    state after this update), 70001 elements at 1 and 2 threads: equal to the compiled kernel bit for
    bit (same operations in the same order) and to its eager definition (``hypergrad.fused._update``)."""
    import hypergrad.fused as HF

    family, x, g, g_last, state, h, h_last = _update_problem(70001, dtype)
    h = {**h, "beta2_lion": torch.tensor(0.97, dtype=torch.float64)}  # (the non-recording update reads it)
    names = family.state_names
    t, t_last = torch.tensor(5.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    outs = {}
    for label, native, threads in (("compiled", False, None), ("native1", True, 1), ("native2", True, 2)):
        kern = HyperKernels(family, "decoupled", ALL, native=native)
        pre, pre_last = kern.scalars(h, t), kern.scalars(h_last, t_last)
        fn = kern.update_for(h, t, pre, (h_last, t_last, pre_last), record, rotate=record)
        assert isinstance(fn, N.MadaUpdate) == native
        if native:
            fn.threads = threads
        xs, ss = x.clone(), [state[k].clone() for k in names]
        fn(xs, g, ss, g_last.clone(), None)
        outs[label] = [xs, *ss]
    xs, ss = x.clone(), [state[k].clone() for k in names]
    pre, pre_last = HF.HyperKernels(family, "decoupled", ALL).scalars(h, t), HF.HyperKernels(
        family, "decoupled", ALL).scalars(h_last, t_last)
    HF._update(family, "decoupled", names, xs, g, ss, g_last.clone(), None, h, t, pre, (h_last, t_last, pre_last),
               "g_prev" if record else None)
    eager = [xs, *ss]
    assert not torch.equal(outs["native1"][0], x)
    assert torch.equal(outs["native1"][1 + names.index("g_prev")], g)  # the new record, or the new g_prev
    advanced = HF.HyperKernels(family, "decoupled", ALL).advance(g_last, [state[k] for k in names], h_last, t_last,
                                                                 pre_last)
    m_after = outs["native1"][1 + names.index("m")]
    gap = ((m_after - advanced["m"]).abs().max() / advanced["m"].abs().max()).item()
    assert (gap < 1e-5) == record, gap  # recording keeps the advanced state
    for a, b, c, e in zip(outs["compiled"], outs["native1"], outs["native2"], eager):
        assert torch.equal(a, b) and torch.equal(b, c)
        # (float32: the eager ops round their 0-D float64 scalars differently, and a rounding step can
        # flip a sign(): a few ulp, here and there more in a tiny v_tilde; float64: exact to rounding)
        rtol, atol = (1e-5, 1e-12) if dtype == torch.float32 else (1e-14, 0.0)
        torch.testing.assert_close(b, e, rtol=rtol, atol=atol)


@needs_kernel
def test_native_update_serves_only_updates_after_a_recorded_one_with_decoupled_decay():
    """The first (recording, not rotating) update, one after a recorded one that records into another
    buffer, L2 weight decay and strided tensors take the compiled kernel; an update after a recorded one
    without ``g_last`` is an error."""
    family, x, g, g_last, state, h, h_last = _update_problem(4099, torch.float64, seed=1)
    names = family.state_names
    t, t_last = torch.tensor(5.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    kern = HyperKernels(family, "decoupled", ALL)
    pre, pre_last = kern.scalars(h, t), kern.scalars(h_last, t_last)
    assert not isinstance(kern.update_for(h, t, pre, None, True), N.MadaUpdate)
    assert not isinstance(kern.update_for(h, t, pre, (h_last, t_last, pre_last), True), N.MadaUpdate)
    assert not isinstance(HyperKernels(family, "l2", ALL).update_for(h, t, pre, (h_last, t_last, pre_last), True,
                                                                     rotate=True), N.MadaUpdate)
    fn = kern.update_for(h, t, pre, (h_last, t_last, pre_last), True, rotate=True)
    assert isinstance(fn, N.MadaUpdate)
    with pytest.raises(ValueError, match="g_last is required"):
        fn(x.clone(), g, [state[k].clone() for k in names], None)
    wide = torch.zeros(2 * x.numel(), dtype=x.dtype)
    strided = wide[::2]
    strided.copy_(x)
    ss = [state[k].clone() for k in names]
    fn(strided, g, ss, g_last.clone(), None)  # the compiled kernel (made now), on the strided x
    xs, ss2 = x.clone(), [state[k].clone() for k in names]
    fn(xs, g, ss2, g_last.clone(), None)  # the native one
    assert sum(k.compiled_graphs() for k in kern._kernels.values()) == 1  # the strided call's
    torch.testing.assert_close(strided, xs, rtol=1e-14, atol=0)
    for a, b in zip(ss, ss2):
        assert torch.equal(a, b)
