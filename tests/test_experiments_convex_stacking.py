"""Smoke tests of experiments/convex.py (Reddi et al.'s counterexample) and experiments/stacking.py.

Few steps each; the full runs are the scripts themselves (experiments/README.md).
"""
import json
import math

import numpy as np
import pytest
import torch

from experiments import convex, stacking
from experiments.convex import ConvexConfig, coefficient, run_one
from experiments.driver import one_thread
from experiments.stacking import StackingConfig, load_digits_split, make_optimizer

import hypergrad


# ------------------------------------------------------------------------------------------ convex
def test_problem_and_optimum():
    cfg = ConvexConfig()
    slopes = np.array([coefficient(t, cfg) for t in range(1, 203)])
    assert slopes[0] == 1010 and slopes[101] == 1010 and (slopes[1:101] == -10).all()
    assert (np.cumsum(slopes) > 0).all()        # every horizon's best fixed point is x = -1
    with pytest.raises(ValueError, match="optimum"):
        ConvexConfig(big=100.0)


@pytest.fixture(scope="module")
def convex_runs():
    """2000 steps (~20 periods) of each baseline; alpha_t = 1/sqrt(t), betas (0.9, 0.99)."""
    cfg = ConvexConfig(steps=2000, hyper_lrs=())
    with one_thread():   # one-element tensors: threads only add overhead
        return cfg, {name: run_one(name, cfg) for name in ("adam", "amsgrad", "avgrad")}


def test_amsgrad_and_avgrad_approach_minus_one_adam_does_not(convex_runs):
    cfg, runs = convex_runs
    tail = {name: r["x"][-cfg.period:].mean() for name, r in runs.items()}   # mean over the last period
    # At 2000 steps (full run, 10k steps: Adam +0.99, AMSGrad -0.80, AVGrad -0.92) the margins are wide.
    assert tail["adam"] > 0.5, tail
    assert tail["amsgrad"] < -0.4 and tail["avgrad"] < -0.4, tail
    # ...and over the last 5 periods they still move towards -1, while Adam moves towards +1
    def drift(name):
        x = runs[name]["x"]
        return x[-cfg.period:].mean() - x[-5 * cfg.period:-4 * cfg.period].mean()

    assert drift("amsgrad") < 0 and drift("avgrad") < 0 and drift("adam") > 0
    # regret: f_1(x_1) - f_1(-1) = 1010 (0 + 1) at the first step
    for r in runs.values():
        assert r["avg_regret"][0] == pytest.approx(1010.0)
        assert r["avg_regret"][-1] < 5.0


def test_projection_is_in_place(convex_runs):
    cfg, runs = convex_runs
    for name, r in runs.items():
        x, state = r["parameter"], r["state"]
        assert (np.abs(r["x"]) <= 1.0).all()
        assert r["x"].min() == -1.0                      # the boundary was hit and held exactly...
        assert int(state["step"]) == cfg.steps          # ...without resetting or freezing the optimizer:
        assert r["optimizer_object"].param_groups[0]["params"][0] is x   # the same tensor object
        assert len(set(np.round(r["x"][-50:], 12))) > 1   # still moving


def test_mada_learns_rho_from_the_adam_vertex():
    cfg = ConvexConfig(steps=300, hyper_lrs=(0.1,))
    r = run_one("mada_hlr0.1", cfg)
    rho = r["rho"]
    assert rho.shape == (300,) and ((0 <= rho) & (rho <= 1)).all()
    assert rho[0] == pytest.approx(1.0, abs=0.2) and rho.min() < 0.5   # starts at Adam, moves towards AVGrad
    assert r["coefficients"]["rho"] == pytest.approx(rho[-1])
    assert isinstance(r["optimizer_object"], hypergrad.HyperOptimizer)
    assert set(r["coefficients"]) == {"rho"}


def test_convex_run_writes_plot_and_summary(tmp_path):
    cfg = ConvexConfig(steps=150, hyper_lrs=(1e-2,))
    report = convex.run(cfg, out=tmp_path, progress=False)
    assert (tmp_path / "convex.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["results"]) == {"adam", "amsgrad", "avgrad", "mada_hlr0.01"}
    assert "final_rho" in summary["results"]["mada_hlr0.01"] and "final_rho" not in summary["results"]["adam"]
    for r in summary["results"].values():
        assert len(r["trajectory"]["t"]) == 150 and math.isfinite(r["final_avg_regret"])
    with pytest.raises(ValueError, match="unknown optimizer"):
        convex.run(cfg, only=["sgd"], out=None)


# ------------------------------------------------------------------------------------------ stacking
def test_digits_split_is_fixed():
    a, b = load_digits_split(), load_digits_split()
    assert a.x_train.shape == (1347, 64) and a.x_test.shape == (450, 64)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert abs(float(a.x_train.mean())) < 1e-5 and sorted(set(a.y_test.tolist())) == list(range(10))


def test_tower_depths():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not isinstance(make_optimizer(params, 0, 0.1, (1e-3,)), hypergrad.HyperOptimizer)
    for depth in (1, 2, 3):
        opt = make_optimizer(params, depth, 0.1, (1e-3, 1e-4, 1e-5))
        assert isinstance(opt, hypergrad.HyperOptimizer) and opt.learn == ("lr",) and len(opt.tower) == depth
        assert [lv.lr for lv in opt.tower] == [1e-3, 1e-4, 1e-5][:depth]
        assert [bool(lv.learn) for lv in opt.tower] == [True] * (depth - 1) + [False]
    with pytest.raises(ValueError, match="depths"):
        StackingConfig(depths=(4,), hyper_lrs=(1e-3,))


def test_stacking_tiny_run(tmp_path):
    cfg = StackingConfig(lrs=(1e-3, 0.3), depths=(0, 1, 2), seeds=(0,), steps=40)
    report = stacking.run(cfg, out=tmp_path, progress=False)
    assert (tmp_path / "stacking.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(saved["runs"]) == 6 and set(saved["summary"]) == {"0", "1", "2"}
    runs = {(r["depth"], r["lr0"]): r for r in report["runs"]}
    assert all(math.isfinite(r["test_loss"]) for r in runs.values())
    assert runs[(0, 1e-3)]["final_rates"] == [1e-3]              # depth 0: lr fixed
    assert runs[(1, 1e-3)]["final_rates"][0] > 1e-3              # depth 1: learned upwards from a tiny lr
    assert len(runs[(2, 1e-3)]["final_rates"]) == 2              # [lr, kappa_1]
    # from a tiny initial lr, the learned lr trains much further than the fixed one in 40 steps
    assert runs[(1, 1e-3)]["test_loss"] < runs[(0, 1e-3)]["test_loss"] - 0.3
