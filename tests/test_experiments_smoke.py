"""Smoke tests of experiments/: data, model, the step benchmark and the demo (a few seconds in all)."""
import dataclasses
import json
import math

import pytest
import torch

from experiments import bench_step, demo
from experiments.data import SPLITS, get_batch, load_shakespeare
from experiments.model import CONFIGS, GPT, GPTConfig, MLP, MLPConfig, build_model, count_parameters, param_groups


# ------------------------------------------------------------------------------------------ data
def test_corpus_loads_with_char_vocab():
    corpus = load_shakespeare()
    assert corpus.train.dtype == torch.uint8 and corpus.val.dtype == torch.uint8
    assert corpus.train.dim() == 1 and corpus.val.dim() == 1
    n_train, n_val = len(corpus.train), len(corpus.val)
    assert n_train > 4_000_000 and n_val > 400_000      # ~5 MB of text, ~10% held out
    assert 0.08 < n_val / (n_train + n_val) < 0.12
    assert len(corpus.files) == 42 and all(f.endswith("_gut.txt") for f in corpus.files)
    assert list(corpus.vocab) == sorted(set(corpus.vocab)) and "\n" in corpus.vocab and " " in corpus.vocab
    assert int(corpus.train.max()) < corpus.vocab_size and int(corpus.val.max()) < corpus.vocab_size
    assert corpus.decode(corpus.encode("To be, or not to be")) == "To be, or not to be"
    assert load_shakespeare() is corpus                  # cached per process


@pytest.mark.parametrize("split", SPLITS)
def test_batches_shape_dtype_and_seeding(split):
    corpus = load_shakespeare()
    x, y = get_batch(split, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])              # y is x shifted by one character
    assert int(x.min()) >= 0 and int(x.max()) < corpus.vocab_size
    x2, _ = get_batch(split, 4, 32, torch.Generator().manual_seed(0))
    x3, _ = get_batch(split, 4, 32, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_bad_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        get_batch("test", 2, 8)


# ------------------------------------------------------------------------------------------ model
def test_gpt_forward_backward_and_tied_weights():
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=84)
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    idx = torch.randint(0, 84, (3, 16))
    logits, loss = model(idx, idx.roll(-1, 1))
    assert logits.shape == (3, 16, 84)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(84)) < 0.5   # near-uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    logits, loss = model(idx[:, :5])                      # shorter than block_size, no targets
    assert logits.shape == (3, 5, 84) and loss is None
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_param_groups_decay_matrices_only():
    model = build_model("tiny", vocab_size=84)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))   # tied weight listed once
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == count_parameters(model)


@pytest.mark.parametrize("name, low, high", [("demo", 0.75e6, 0.85e6), ("bench10m", 10.4e6, 11.0e6),
                                             ("mlp10m", 9.5e6, 11.0e6)])
def test_named_configs_have_their_sizes(name, low, high):
    with torch.device("meta"):                            # no memory, no init cost
        model = build_model(name)
    assert low < count_parameters(model) < high
    assert isinstance(model, MLP if name.startswith("mlp") else GPT)


def test_mlp_forward():
    model = MLP(MLPConfig(in_features=8, hidden=16, n_hidden_layers=2, out_features=3))
    logits, loss = model(torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert logits.shape == (5, 3) and math.isfinite(loss.item())


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gpt3")


# ------------------------------------------------------------------------------------------ bench
def test_bench_step_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_step.main(["--model", "tiny", "--steps", "3", "--warmup", "1", "--out", str(out), "--no-progress"])
    report = json.loads(out.read_text())
    for key in ("machine", "torch", "git_commit", "config", "results"):
        assert key in report
    assert report["config"]["steps"] == 3 and report["config"]["model"] == "tiny"
    results = report["results"]
    assert set(results) == set(bench_step.CANDIDATES)
    for name in ("torch_adamw_fused", "torch_adamw_foreach", "sgd", "adam", "adamw", "amsgrad", "avgrad", "yogi",
                 "adan", "adan_original", "lion", "nadam", "mada"):
        r = results[name]
        assert r["n"] == 3 and r["median_ms"] > 0 and r["ratio_to_fused"] > 0 and math.isfinite(r["ratio_to_fused"])
    assert results["torch_adamw_fused"]["ratio_to_fused"] == 1.0
    assert "| mada |" in capsys.readouterr().out


def test_bench_step_interval_table():
    """Table (h): each cycle of k steps holds one recording and one learning step (as the optimizer
    reports them) and k - 2 plain ones; every step both records and learns at k = 1."""
    tab = bench_step.interval_table("tiny", (1, 2, 4), steps=8, warmup=1, device=torch.device("cpu"), progress=False)
    assert tab["warmup"] == 5  # every kind of step ran before the timing
    counts = {r["interval"]: r["kind_counts"] for r in tab["results"].values()}
    assert counts == {1: {"every": 8}, 2: {"recording": 4, "learning": 4},
                      4: {"recording": 2, "learning": 2, "plain": 4}}
    assert [tab["results"][f"every{k}"]["cycles"] for k in (1, 2, 4)] == [8, 4, 2]
    assert all(r["amortized_ratio"] > 0 for r in tab["results"].values())
    v = bench_step.verdicts({"interval": tab})
    assert len(v) == 1 and v[0]["met"] is None and "k=2" in v[0]["measured"] and "k=4" in v[0]["measured"]


def test_bench_step_kernel_table():
    """(g): each kernel of the hyper step is timed next to fused AdamW, with its bandwidth floor."""
    tab = bench_step.kernel_table(5000, steps=2, warmup=1, device=torch.device("cpu"), progress=False, in_cache_rounds=3)
    from hypergrad.native import mada_kernels_available
    # with the native MADA kernels (where they could be built), also the compiled ones they replace
    native = {"vjp_compiled", "update_compiled"} if mada_kernels_available() else set()
    # with a C compiler, the plain-C traffic loops (experiments.traffic)
    c_floors = {"c_adamw": 7, "c_vjp_io": 8, "c_rule_io": 15, "c_hyper_io": 23} if bench_step._traffic_loops(6) else {}
    assert set(tab["results"]) == {"torch_adamw_fused", "vjp", "update", "rule", "one_pass", "vjp_io", "update_io",
                                   "rule_io"} | native | set(c_floors)
    assert tab["states"] == 6 and tab["reductions"] == 6
    floors = {n: r["floor_bytes"] for n, r in tab["results"].items()}
    # the update as the library runs MADA's: the new record rotates into g_prev's buffer (2S + 4)
    assert floors == {"torch_adamw_fused": 7, "vjp": 8, "update": 16, "rule": 15, "one_pass": 17,
                      "vjp_io": 8, "update_io": 16, "rule_io": 15,
                      **{n: {"vjp_compiled": 8, "update_compiled": 16}[n] for n in native}, **c_floors}
    for r in tab["results"].values():
        assert r["n"] == 2 and r["median_ms"] > 0 and math.isfinite(r["floor_efficiency"])
    for name, r in tab["results"].items():  # the arithmetic, in cache (not through FusedKernel's step API)
        assert ("in_cache_ns" in r) == (name != "rule")
        assert name == "rule" or (math.isfinite(r["in_cache_ns"]) and math.isfinite(r["arith_ratio"]))
    assert tab["in_cache_sizes"] == [4096, 20480]
    with pytest.raises(ValueError, match="in_cache_sizes"):
        bench_step.in_cache_ns([20480, 4096], 2, 2, torch.device("cpu"), progress=False)


def test_kernel_table_reads_floor_and_vjp_bound_text():
    """(g)'s text from measured rows: the floors counted in buffers read, at fused AdamW's time per buffer
    read (4) and at vjp_io's (its time over its S + 2 reads); the bytes model kept where writes cost."""
    def rows(rule_io_ms):
        ms = {bench_step.FUSED: 4.0, "vjp": 17.0, "update": 20.0, "vjp_io": 16.0, "rule_io": rule_io_ms}
        return {n: {"median_ms": v, "ratio_to_fused": v / 4.0, "arith_ratio": 4.5 if n == "vjp" else 1.0,
                    "floor_ratio": 8 / 7} for n, v in ms.items()}
    text = bench_step._reads_paragraph(rows(16.8), 6)  # per read 2 ms; 7 writes back 0.8 ms: 0.06 of a read
    assert "costs 1.05x vjp_io" in text and "cost 0.06 of one read" in text
    assert "2S + 4 = 16" in text and "4.00x at fused AdamW's own time per buffer read" in text
    assert "8.00x at vjp_io's (2.00 ms per buffer)" in text and "This scheme reads 17" in text and "8.50x" in text
    assert "nothing measurable" in bench_step._reads_paragraph(rows(15.0), 6)
    assert "holds here" in bench_step._reads_paragraph(rows(30.0), 6)  # writes cost a read each: no reads floor
    assert bench_step._reads_paragraph({n: r for n, r in rows(16.8).items() if n != "rule_io"}, 6) is None
    r = rows(16.8)
    assert "bound it about equally" in bench_step._vjp_bound(r)  # 4.5 against 4.0
    r["vjp"]["arith_ratio"] = 6.0
    assert "it is bound by its arithmetic (the kernel: 4.25x)" in bench_step._vjp_bound(r)
    r["vjp"]["arith_ratio"] = 2.0
    assert "it is bound by its reads" in bench_step._vjp_bound(r)


def test_kernel_table_plain_c_floor_text():
    """(g)'s measured floors: the plain-C rows against the targets, and the verdicts' notes that cite them."""
    def rows(hyper, rule):
        ms = {bench_step.FUSED: 4.0, "c_adamw": 3.8, "c_hyper_io": 4.0 * hyper, "c_rule_io": 4.0 * rule}
        return {n: {"median_ms": v, "ratio_to_fused": v / 4.0} for n, v in ms.items()}
    text = bench_step._c_floor_paragraph(rows(4.0, 2.2), 6)
    assert "(c_hyper_io: 16 buffers read, 7 written) costs 4.00x fused AdamW, above the 2.5x target" in text
    assert "(c_rule_io: 8 read, 7 written) 2.20x, above the 2.0x target" in text
    assert "(c_adamw) 0.95x" in text and "no implementation of the exact algorithms gets under the targets" in text
    text = bench_step._c_floor_paragraph(rows(4.0, 1.85), 6)
    assert "1.85x, within the 2.0x target" in text and "no implementation" not in text
    text = bench_step._c_floor_paragraph(rows(4.0, 2.05), 6)  # within 5%: at the target, not over it
    assert "2.05x, at the 2.0x target, before any arithmetic" in text and "no implementation" not in text
    assert bench_step._c_floor_paragraph({n: r for n, r in rows(4.0, 2.1).items() if n != "c_hyper_io"}, 6) is None
    res = rows(4.0, 2.1)
    res.update({n: {"ratio_to_fused": 1.0} for n in ("vjp_io", "update_io", "rule_io")})
    step = {bench_step.HYPER_MAIN: {"ratio_to_fused": 5.0, "floor_ratio": 3.4},
            "mada_fused": {"ratio_to_fused": 2.3, "floor_ratio": 2.1}}
    notes = {v["target"]: v["note"] for v in bench_step.verdicts({"kernels": {"results": res},
                                                                   "step": {"m": {"results": step}}})}
    assert "least traffic of any exact hyper step, plain C (g): 4.00x" in notes["hyper MADA step <= 2.5x fused AdamW (m)"]
    rule_note = next(n for t, n in notes.items() if t.startswith("MADA (hyper off)"))
    assert "in plain C (g): 2.10x" in rule_note


def test_one_pass_what_if_kernel_computes_the_two_kernels_results():
    """(g)'s one_pass kernel, in float64: its partial hypergradient is the vjp kernel's, its x the update
    kernel's, and the state it writes out of place the state after the recorded update (``advance``)."""
    from hypergrad.fused import HyperKernels
    from optimizers.compiled import TensorKernel
    fam = bench_step.family("mada")
    names, S = fam.state_names, len(fam.state_names)
    learn = tuple(n for n, c in fam.coefficients.items() if c.learnable)
    gen = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    n = 3001
    x, g, g_last = (torch.randn(n, generator=gen, **f64) * s for s in (1.0, 1e-2, 1e-2))
    states = [torch.rand(n, generator=gen, **f64) * 1e-4 for _ in range(S)]
    h = {k: torch.tensor(float(c.init), **f64) for k, c in fam.coefficients.items()}
    h.update(beta3=torch.tensor(0.1, **f64), gamma=torch.tensor(0.8, **f64), c=torch.tensor(0.7, **f64),
             lr=torch.tensor(1e-3, **f64), weight_decay=torch.tensor(0.1, **f64))
    h_old = {**h, "beta1": torch.tensor(0.85, **f64), "rho": torch.tensor(0.4, **f64)}
    t_old, t = torch.tensor(4.0, **f64), torch.tensor(5.0, **f64)
    kern = HyperKernels(fam, "decoupled", learn)
    q = torch.stack([h_old[k] for k in learn])
    fixed = {k: v for k, v in h_old.items() if k not in learn}
    pre, pre_old = kern.scalars(h, t), kern.scalars(h_old, t_old)

    partial_ref, sum_ref = kern.partial_for(fixed, t_old)(g_last, states, g, q)
    x_ref, st_ref, store_ref = x.clone(), [b.clone() for b in states], torch.empty_like(g)
    kern.update_for(h, t, pre, (h_old, t_old, pre_old), True)(x_ref, g, st_ref, g_last, store_ref)
    advanced = kern.advance(g_last, states, h_old, t_old, pre_old)

    one = TensorKernel(bench_step._one_pass(fam, "decoupled", names, learn, tuple(fixed), tuple(h), tuple(pre)), "t")
    x_one, new, store = x.clone(), [torch.full_like(g, math.nan) for _ in range(S)], torch.empty_like(g)
    old = [b.clone() for b in states]
    partial, total = one.bind(*fixed.values(), *h.values(), t, *pre.values(), *h_old.values(), t_old,
                              *pre_old.values())(x_one, g, *old, *new, g_last, store, q)
    torch.testing.assert_close(partial, partial_ref, rtol=1e-12, atol=1e-18)
    torch.testing.assert_close(total, sum_ref, rtol=1e-12, atol=1e-18)
    torch.testing.assert_close(x_one, x_ref, rtol=1e-14, atol=1e-18)
    assert not torch.equal(x_one, x)
    torch.testing.assert_close(store, g, rtol=0, atol=0)
    for k, b in zip(names, new):
        torch.testing.assert_close(b, advanced[k], rtol=1e-14, atol=1e-20)
    for a, b in zip(old, states):  # the state it reads is left as it was
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_states, reductions", [(6, 6), (6, 3), (2, 4)])
def test_bench_step_io_kernels_move_what_they_stand_for(n_states, reductions):
    """The traffic-only kernels of table (g) read and write what the kernels they stand for do:
    every output depends on every buffer read (a changed input changes it), every written buffer
    is written, and the vjp's stand-in returns one sum per learned coefficient."""
    gen = torch.Generator().manual_seed(0)

    def rnd():
        return torch.rand(64, generator=gen, dtype=torch.float64)

    g, g_last, states = rnd(), rnd(), [rnd() for _ in range(n_states)]
    out = bench_step._vjp_io(g_last, g, *states, reductions=reductions)
    assert out.shape == (reductions,)
    for k, b in enumerate([g_last, g, *states]):
        bumped = [t.clone() for t in (g_last, g, *states)]
        bumped[k] += 1.0
        assert not torch.equal(bench_step._vjp_io(*bumped, reductions=reductions), out), k
    x = rnd()
    before = [t.clone() for t in (x, *states)]
    bench_step._update_io(x, g, g_last, *states)
    assert torch.equal(states[-1], g)  # the new record, in g_prev's buffer (the library's rotation)
    assert all(not torch.equal(a, b) for a, b in zip(before, (x, *states)))
    for k in range(2 + n_states):  # the update reads g_last, g and every state buffer as it was
        inputs = [g_last.clone(), g.clone(), *(t.clone() for t in before[1:])]
        inputs[k] += 1.0
        x_k = before[0].clone()
        bench_step._update_io(x_k, inputs[1], inputs[0], *inputs[2:])
        assert not torch.equal(x_k, x), k
    before = [t.clone() for t in (x, *states)]
    bench_step._rule_io(x, g, *states)
    assert all(not torch.equal(a, b) for a, b in zip(before, (x, *states)))


def test_bench_step_gradients_alternate_between_two_fixed_sets():
    """Rounds alternate two fixed gradient sets (g - g_prev stays away from 0, as in training)."""
    model = build_model("tiny", vocab_size=84)
    before_round = bench_step.GradientSets(model, seed=0)
    grads = {}
    for r in range(4):
        before_round(r)
        grads[r] = [p.grad for p in model.parameters()]
    assert all(a is c for a, c in zip(grads[0], grads[2])) and all(b is d for b, d in zip(grads[1], grads[3]))
    assert all(not torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    assert all(a.shape == p.shape and 0.005 < a.std().item() < 0.02 for a, p in zip(grads[1], model.parameters())
               if a.numel() > 100)


def test_bench_round_order_varies_each_candidates_predecessor():
    """Each round's order is a seeded permutation, and over many rounds every candidate runs after
    each of the others (a rotated fixed order kept each after the same one in most rounds)."""
    names = ["adamw", "depth1", "depth2", "depth3"]
    orders = [bench_step.round_order(names, r) for r in range(60)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == [bench_step.round_order(names, r) for r in range(60)]  # reproducible
    follows = {(o[i - 1], o[i]) for o in orders for i in range(1, len(o))}
    assert follows == {(a, b) for a in names for b in names if a != b}
    first = [o[0] for o in orders]
    assert all(8 <= first.count(n) <= 22 for n in names)  # no candidate starts (or ends) most rounds


def test_bench_step_only_and_registry(tmp_path):
    calls = []

    class Counting:
        def __init__(self, params):
            self.opt = torch.optim.SGD(params, lr=0.0)

        def step(self):
            calls.append(1)
            self.opt.step()

    bench_step.register("counting", Counting)
    try:
        report = bench_step.run("tiny", steps=2, warmup=1, only=["counting"], progress=False)
    finally:
        del bench_step.CANDIDATES["counting"]
    assert set(report["results"]) == {"torch_adamw_fused", "torch_adamw_foreach", "counting"}
    assert len(calls) == 3                                # warm-up + timed rounds
    with pytest.raises(ValueError, match="unknown candidate"):
        bench_step.run("tiny", steps=2, warmup=0, only=["nope"], progress=False)


# ------------------------------------------------------------------------------------------ demo
def test_bench_analytic_counts_and_floors():
    a = bench_step.analytic
    assert a("torch_adamw_fused")["buffers"] == 2 and a("torch_adamw_fused")["floor_bytes"] == 7
    assert a("adam")["buffers"] == a("adam_fused")["buffers"] == 2 and a("adam_fused")["floor_bytes"] == 7
    assert a("mada_fused")["buffers"] == 6 and a("mada_fused")["floor_bytes"] == 15      # 2S+3
    assert a("nadam")["buffers"] == 2                                                    # scalar mu_product not counted
    # S+1, 3S+6: the record rotates into g_prev's buffer (a rule without such a state: S+2, 3S+7)
    assert a("mada_hyper_fused")["buffers"] == 7 and a("mada_hyper_fused")["floor_bytes"] == 24
    model = build_model("tiny", vocab_size=84)
    groups = param_groups(model, 0.1)
    # S+1 (the lagging state and the g copy); no copy of x: MADA's decay is decoupled and lr is not learned
    assert a("mada_hyper", groups)["buffers"] == pytest.approx(7)
    assert a("mada_hyper", groups)["floor_bytes"] == pytest.approx(23)    # 3S+6 - g_prev (the record, unwritten)
    mada, adam = bench_step.family("mada"), bench_step.family("adam")
    assert bench_step.eager_hyper_buffers(mada, 0.1, "decoupled") == (7, False)
    assert bench_step.eager_hyper_buffers(mada, 0.1, "l2") == (8, True)     # the rule reads g + wd x: x recorded
    assert bench_step.eager_hyper_buffers(adam, 0.1, "l2") == (4, True)
    assert bench_step.eager_hyper_buffers(adam, 0.0, "l2") == (3, False)
    assert a("nope") is None
    assert abs(count_parameters(bench_step.make_model("mlp10m", device=torch.device("meta"),
                                                      **{k: bench_step.mlp_width(10e6) for k in ("in_features", "hidden")}))
               - 10e6) < 0.2e6
    fit = bench_step.linear_fit([1, 2, 4], [3, 5, 9])
    assert fit["slope_ms_per_m"] == pytest.approx(2) and fit["intercept_ms"] == pytest.approx(1)
    assert fit["r2"] == pytest.approx(1)


def test_bench_memory_measured_matches_analytic():
    tab = bench_step.memory_table("tiny", ["torch_adamw_fused", "adam", "mada", "mada_hyper"], torch.device("cpu"),
                                  progress=False)
    for name, r in tab["results"].items():
        assert r["measured_buffers"] == pytest.approx(r["analytic_buffers"], abs=0.05), name
        assert r["reachable_buffers"] == pytest.approx(r["analytic_buffers"], abs=0.05), name
        assert r["peak_buffers"] >= r["measured_buffers"] - 1e-6
    assert tab["results"]["torch_adamw_fused"]["peak_vs_fused_adamw"] == 1.0


def test_bench_run_all_and_doc_on_tiny_models(tmp_path):
    cpu = torch.device("cpu")
    report = bench_step.run_all(
        models=["tiny", "mlp_tiny"], only=["adam", "mada", "mada_hyper"], steps=2, warmup=1, slow_steps=2,
        memory_model="tiny", train=(("demo", "tiny", 4, None, 2), ("shakespeare", "tiny", 2, 8, 2),
                                    ("bf16", "tiny", 2, None, 2, torch.bfloat16)),
        train_candidates=("torch_adamw_fused", "mada", "mada_hyper"), scaling_sizes=(0.005, 0.01), scaling_steps=2,
        scaling_candidates=("torch_adamw_fused", "mada"), tower_model="tiny", tower_steps=2, tower_fused=False,
        tower_small_model="tiny", tower_small_steps=2, kernel_numel=5000, kernel_steps=2, device=cpu, progress=False)
    assert report["kind"] == "all"
    assert report["kernels"]["results"]["vjp"]["floor_bytes"] == 8
    step = report["step"]["tiny"]["results"]
    assert step["torch_adamw_fused"]["ratio_to_fused"] == 1.0 and step["mada_hyper"]["group"] == "slow"
    assert step["mada"]["floor_bytes"] == 15 and step["mada"]["ratio_to_fused"] > 0
    assert set(report["memory"]["results"]) == {"torch_adamw_fused", "torch_adamw_foreach", "adam", "mada", "mada_hyper"}
    assert [r["n_params"] for r in report["scaling"]["rows"]] == sorted(r["n_params"] for r in report["scaling"]["rows"])
    assert set(report["tower"]["results"]) == set(report["tower_small"]["results"]) == {"depth1", "depth2", "depth3"}
    assert set(bench_step.tower_level_estimate(report)) == {"depth2", "depth3"}
    assert "projected_ratio" in report["train"]["shakespeare"]["results"]["mada_hyper"]
    bf16 = report["train"]["bf16"]  # the GPU rows' code path (autocast forward, tokens/s, state bytes), on a CPU
    assert bf16["autocast"] == "torch.bfloat16" and bf16["device"] == "cpu"
    for name, r in bf16["results"].items():
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["step_ms"] / 1e3))
        assert "step_peak_mb" not in r  # CUDA only
    # the state of hyper-learning MADA (6 buffers, records, gradient buffers) outweighs AdamW's 2 buffers
    assert bf16["results"]["mada_hyper"]["optimizer_state_mb"] > 2 * bf16["results"]["torch_adamw_fused"]["optimizer_state_mb"] > 0
    targets = [v["target"] for v in report["verdicts"]]
    assert any("2.5x" in t for t in targets) and any("tower" in t for t in targets) and any("linear" in t for t in targets)
    doc = tmp_path / "performance.md"
    text = bench_step.write_doc(report, doc)
    assert doc.read_text() == text
    for heading in ("## Verdicts", "## (a)", "## (b)", "## (d)", "## (e)", "## (f)", "## (g)", "| vjp |",
                    "in-cache ns/el | arith x |", "Their arithmetic alone", report["torch"]):
        assert heading in text
    assert "| mada_hyper | hyper eager |" in text
    assert "forward in torch.bfloat16 autocast" in text and "tokens/s" in text


def test_bench_gpt2_124m_shapes():
    """The GPU rows' model: GPT-2 124M shapes (built on the meta device: no memory, no compute)."""
    with torch.device("meta"):  # built there (moving a built model to meta would untie wte and lm_head)
        model = bench_step.make_model("gpt2_124m")
    assert abs(count_parameters(model) / 1e6 - 124.4) < 0.5
    assert model.config.vocab_size == 50304 and model.config.block_size == 1024
    assert bench_step.make_model("demo", device=torch.device("meta")).config.vocab_size == 84


def test_bench_all_cli_writes_json_and_doc(tmp_path):
    out, doc = tmp_path / "b.json", tmp_path / "perf.md"
    bench_step.main(["--all", "--models", "tiny", "--only", "adam", "--steps", "2", "--slow-steps", "1",
                     "--memory-model", "tiny", "--tower-model", "", "--tower-small-model", "", "--scaling-sizes", "",
                     "--no-train",
                     "--device", "cpu", "--out", str(out), "--doc", str(doc), "--no-progress"])
    report = json.loads(out.read_text())
    assert report["kind"] == "all" and "--all" in report["argv"] and report["config"]["device"] == "cpu"
    assert "## Verdicts" in doc.read_text() and "tiny" in report["step"]


def test_bench_step_all_reports_each_phase_and_renders_the_gpu_rows(tmp_path):
    """``run_all`` writes its report after every phase (``complete`` false until the end); the final report
    (an autocast dtype in its train rows included) is JSON; the page renders the committed GPU reports
    as its *GPU rows*, and ``--render`` writes the same page from the JSON without measuring."""
    from pathlib import Path

    partial = tmp_path / "partial.json"
    report = bench_step.run_all(models=["tiny"], only=["mada_fused"], steps=2, warmup=1, slow_steps=1,
                                memory_model=None, train=(("tiny_bf16", "tiny", 2, None, 1, torch.bfloat16),),
                                scaling_sizes=(), tower_model=None, tower_small_model=None, kernel_numel=0,
                                interval_model=None, device=torch.device("cpu"), progress=False, partial_out=partial)
    written = json.loads(partial.read_text())
    assert written["complete"] is False and set(written["phases"]) == {"step tiny", "train tiny_bf16"}
    assert report["complete"] is True and report["train"]["tiny_bf16"]["autocast"] == "torch.bfloat16"
    full = tmp_path / "all.json"
    full.write_text(json.dumps(report))
    gpu_dir = Path(bench_step.REPO_ROOT) / "docs" / "gpu"
    gpu, diag = gpu_dir / "bench_step_cuda_h100.json", gpu_dir / "gpu_diag_h100.json"
    page = bench_step.write_doc(report, tmp_path / "page.md", json.loads(gpu.read_text()), json.loads(diag.read_text()))
    assert "## GPU rows: GPT-2 124M shapes on NVIDIA H100 80GB HBM3" in page
    assert "#### gpt2_124m_bf16: gpt2_124m (124.37M parameters" in page and "Not this page's commit" in page
    assert "| default | mada_hyper_fused | 30.65 | 10 | 2.50 | 1494 |" in page
    bench_step.main(["--render", str(full), "--doc", str(tmp_path / "rendered.md"), "--gpu-report", str(gpu),
                     "--gpu-diag", str(diag)])
    rendered = (tmp_path / "rendered.md").read_text()
    assert rendered.replace(" This page was rendered from that JSON by `python -m experiments.bench_step --render "
                            f"{full} --doc {tmp_path / 'rendered.md'} --gpu-report {gpu} --gpu-diag {diag}`.",
                            "") == page
    bench_step.main(["--render", str(full), "--doc", str(tmp_path / "noted.md"), "--gpu-report", str(gpu),
                     "--gpu-note", "packing changed since"])
    noted = (tmp_path / "noted.md").read_text()
    assert noted.count("packing changed since") == 1 and "**Note on these rows**" in noted
    with pytest.raises(SystemExit, match="--doc"):
        bench_step.main(["--render", str(full), "--gpu-report", str(gpu)])


def test_gpu_diag_runs_each_variant_and_restores_torch(tmp_path):
    """experiments/gpu_diag.py (a GPU diagnostic; here on the CPU with a tiny model): every variant times
    and profiles each candidate without an error, writes its JSON, and leaves torch.compile and
    Dynamo's limits as it found them."""
    from experiments import gpu_diag

    compile_before, limit_before = torch.compile, torch._dynamo.config.cache_size_limit
    import optimizers.adapter as adapter
    from optimizers.compiled import SegmentPlan, TensorKernel

    before = (torch.compile, torch._dynamo.config.cache_size_limit, TensorKernel.__init__, adapter.SegmentPlan)
    # ("dynamo" is left out: "static" patches all it does, TensorKernel's route, and torch.compile besides)
    variants = ["default", "static", "sized", "pack=64"]
    report = gpu_diag.main(["--device", "cpu", "--model", "tiny", "--variants", ",".join(variants), "--steps", "2",
                            "--warmup", "1", "--eager-chunks", "none,1000", "--sources", "hyper_partial",
                            "--out", str(tmp_path)])
    # the direct route's compilations of the vjp kernel, their Inductor source kept (the sized variant:
    # one per layout, of which the tiny model's two buckets have two; the others one or two, as the
    # guards of the first admit the second bucket or not: a compilation served by Inductor's cache
    # carries fewer guards than one made afresh, which records those of its lowering too)
    sources = {v: sorted(tmp_path.glob(f"source_{v}_hyper_partial_*.py")) for v in ("default", "sized", "pack64")}
    assert len(sources["sized"]) == 2 and all(1 <= len(sources[v]) <= 2 for v in ("default", "pack64")), sources
    assert all("def call(" in f.read_text() for fs in sources.values() for f in fs)
    assert not list(tmp_path.glob("source_static_*"))  # (Dynamo's compilations: no direct source)
    assert (torch.compile, torch._dynamo.config.cache_size_limit, TensorKernel.__init__, adapter.SegmentPlan) == before
    assert adapter.SegmentPlan is SegmentPlan
    assert json.loads((tmp_path / "diag.json").read_text()) == json.loads(json.dumps(report))
    assert list(report["variants"]) == variants and list(report["variant_help"]) == variants
    assert set(report["variants"]["default"]) == {bench_step.FUSED, "mada_fused", "mada_hyper_fused",
                                                  "mada_hyper_chunk=none", "mada_hyper_chunk=1000"}
    assert set(report["variants"]["pack=64"]) == {"mada_fused", "mada_hyper_fused"}
    for res in report["variants"].values():
        for r in res.values():
            assert "error" not in r and r["median_ms"] > 0 and r["top_kernels"], r
            assert r["host_top"] and all(own >= 0 and cum >= own for _, _, own, cum in r["host_top"]), r["host_top"]
            owns = [own for _, _, own, _ in r["host_top"]]
            assert owns == sorted(owns, reverse=True)
    with pytest.raises(ValueError, match="variant"):
        gpu_diag.variant("fast")
