"""Smoke tests of the training script, its config parsing, plots, the demo and the LR sweep (tiny GPT, seconds)."""
import dataclasses
import json
import math

import pytest
import torch

from experiments import demo, plots, sweep_lr, train
from experiments.config import ConfigError, TrainConfig, config_from_dict, parse_coefs, parse_config
from experiments.model import GPT, GPTConfig

COEFS = ("beta1", "beta2", "beta3", "c", "rho", "gamma")


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    fields = dict(model="tiny", batch_size=4, max_iters=6, warmup_iters=2, eval_interval=3, eval_iters=2,
                  eval_batch_size=4, log_interval=2, progress=False, out_dir=str(tmp_path / name))
    fields.update(overrides)
    return TrainConfig(**fields)


def records(path):
    return [json.loads(line) for line in open(path)]


# ------------------------------------------------------------------------------------------ train
@pytest.mark.parametrize("optimizer", ["adamw", "mada"])
def test_train_writes_log_with_manifest_and_summary(tmp_path, optimizer):
    s = train.run(tiny(tmp_path, optimizer, optimizer=optimizer))
    assert s["iters_done"] == 6 and not s["diverged"]
    for key in ("final_train_loss", "final_val_loss", "best_train_loss", "best_val_loss", "wall_s", "ms_per_step"):
        assert math.isfinite(s[key]) and s[key] > 0
    assert s["best_val_loss"] <= s["final_val_loss"] and s["final_val_loss"] < s["initial_val_loss"]
    recs = records(tmp_path / optimizer / "log.jsonl")
    m = recs[0]
    assert m["type"] == "manifest" and m["seed"] == 1337 and m["config"]["optimizer"] == optimizer
    assert "commit" in m["git"] and m["versions"]["torch"] == torch.__version__ and m["model"]["n_params"] > 0
    assert all(k not in json.dumps(m).lower() for k in ("hostname", "nodename"))
    iters = [r for r in recs if r["type"] == "iter"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["iter"] for r in iters] == [2, 4, 6] and [r["iter"] for r in evals] == [0, 3, 6]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["grad_norm"] > 0 for r in iters)
    assert all(math.isfinite(e["train_loss"]) and math.isfinite(e["val_loss"]) for e in evals)
    if optimizer == "mada":
        assert set(iters[-1]["coefficients"]) == set(COEFS) == set(iters[-1]["hypergradients"])
        assert set(s["coefficients"]) == set(COEFS)
        assert iters[-1]["coefficients"]["beta1"] != 0.9          # it learned something
    else:
        assert "coefficients" not in iters[-1] and s["coefficients"] == {}
    assert json.loads((tmp_path / optimizer / "summary.json").read_text())["iters_done"] == 6


@pytest.mark.parametrize("optimizer", ["adamw", "mada"])
def test_checkpoint_loads_with_weights_only(tmp_path, optimizer):
    cfg = tiny(tmp_path, optimizer, optimizer=optimizer, checkpoint_interval=2)
    s = train.run(cfg)
    assert not [p for p in (tmp_path / optimizer).iterdir() if "tmp" in p.name]   # atomic writes: no temporaries
    raw = torch.load(s["checkpoint"], weights_only=True)                       # plain tensors and containers
    ck = train.load_checkpoint(s["checkpoint"])                                # the same, digest checked
    assert raw["payload"]["iter"] == ck["iter"]
    assert ck["iter"] == 6 and set(ck) >= {"model", "optimizer", "scheduler", "config", "rng", "coefficients"}
    assert config_from_dict(TrainConfig, ck["config"]) == cfg
    assert all(isinstance(v, float) for v in ck["coefficients"].values())
    assert (set(ck["coefficients"]) == set(COEFS)) == (optimizer == "mada")
    model = GPT(GPTConfig(vocab_size=84, block_size=16, n_layer=1, n_head=2, n_embd=16))
    model.load_state_dict(ck["model"])
    from experiments.model import param_groups
    opt = train.make_optimizer(cfg, param_groups(model, cfg.weight_decay))
    opt.load_state_dict(ck["optimizer"])
    assert isinstance(ck["rng"]["torch"], torch.Tensor) and isinstance(ck["rng"]["data"], torch.Tensor)


def test_same_seed_same_run_and_same_start(tmp_path):
    a = train.run(tiny(tmp_path, "a"))
    b = train.run(tiny(tmp_path, "b"))
    m = train.run(tiny(tmp_path, "m", optimizer="mada"))
    ra, rb = records(tmp_path / "a" / "log.jsonl"), records(tmp_path / "b" / "log.jsonl")
    assert [r.get("loss") for r in ra[1:]] == [r.get("loss") for r in rb[1:]]
    assert a["final_val_loss"] == b["final_val_loss"]
    assert a["initial_val_loss"] == m["initial_val_loss"]                      # same init and eval batches
    first_a = next(r for r in ra if r["type"] == "iter")
    first_m = next(r for r in records(tmp_path / "m" / "log.jsonl") if r["type"] == "iter")
    assert first_a["lr"] == first_m["lr"]


def test_hyper_settings_reach_the_optimizer(tmp_path):
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = train.make_optimizer(tiny(tmp_path, optimizer="mada", hyper_interval=3, hyper_warmup=2, hyper_lr=0.01),
                               [{"params": params}])
    assert (opt.hyper_interval, opt.warmup, opt.tower[0].lr) == (3, 2, 0.01)


def test_grad_accum_rules_and_no_clip(tmp_path):
    threads = torch.get_num_threads()
    s = train.run(tiny(tmp_path, "acc", grad_accum=2, grad_clip=0.0, max_iters=3, eval_interval=3, threads=1))
    assert torch.get_num_threads() == threads                                   # restored after the run
    assert s["tokens_per_iter"] == 2 * 4 * 16 and math.isfinite(s["final_val_loss"])
    it = [r for r in records(tmp_path / "acc" / "log.jsonl") if r["type"] == "iter"]
    assert it[-1]["grad_norm"] is None                                          # clipping off: not computed
    for name in ("lion", "rule:adamw", "hyperadam"):
        s = train.run(tiny(tmp_path, name.replace(":", "_"), optimizer=name, max_iters=2, eval_interval=2,
                           checkpoint=False))
        assert math.isfinite(s["final_val_loss"]) and s["checkpoint"] is None


def test_lr_schedule_warmup_then_cosine():
    f = train.lr_lambda(TrainConfig(max_iters=110, warmup_iters=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 120))


def test_bad_optimizer_and_coefs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="optimizer='adamx': must be one of adamw, mada, hyperadam, adam, "):
        tiny(tmp_path, optimizer="adamx")
    with pytest.raises(ConfigError, match="AdamW takes only eps"):
        train.run(tiny(tmp_path, coefs="rho=0.5"))
    with pytest.raises(ConfigError, match="mada"):
        train.run(tiny(tmp_path, optimizer="mada", coefs="rho=2.0"))           # outside its domain


# ------------------------------------------------------------------------------------------ config
def test_config_overrides_are_typed():
    cfg = parse_config(TrainConfig, ["--optimizer=mada", "--max_iters=500", "--lr=3e-4", "--progress=false",
                                     "--block-size=32", "--clip_hypergrad=none", "--dropout=0.1", "--checkpoint"])
    assert cfg.optimizer == "mada" and cfg.max_iters == 500 and cfg.lr == 3e-4 and cfg.progress is False
    assert cfg.block_size == 32 and cfg.clip_hypergrad is None and cfg.dropout == 0.1 and cfg.checkpoint is True
    assert isinstance(cfg.max_iters, int) and parse_config(TrainConfig, ["--max_iters=2e3"]).max_iters == 2000
    assert parse_config(TrainConfig, []) == TrainConfig()
    assert parse_coefs("rho=1, gamma=0.5") == {"rho": 1.0, "gamma": 0.5}


@pytest.mark.parametrize("argv, message", [
    (["--max_iter=5"], r"unknown config key --max_iter; did you mean --max_iters\?"),
    (["--nope=1"], r"unknown config key --nope"),
    (["--max_iters=abc"], r"--max_iters='abc': expected int"),
    (["--max_iters=1.5"], r"--max_iters='1.5': expected int"),
    (["--lr=fast"], r"--lr='fast': expected float"),
    (["--progress=maybe"], r"--progress='maybe': expected bool"),
    (["--lr"], r"--lr: missing value"),
    (["--lr=1", "--lr=2"], r"--lr given twice"),
    (["lr=1"], r"expected --key=value"),
    (["--max_iters=0"], r"max_iters=0: must be >= 1"),
    (["--hyper_interval=0"], r"hyper_interval=0: must be >= 1"),
    (["--lr=-1"], r"lr=-1.0: must be a finite number > 0"),
    (["--coefs=rho"], r"coefs: 'rho' is not name=value"),
])
def test_config_errors_name_the_key_and_value(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, argv)


def test_config_from_dict_checks_types():
    assert config_from_dict(TrainConfig, {"lr": 1, "max_iters": 3}).lr == 1.0
    with pytest.raises(ConfigError, match="max_iters='3': expected int"):
        config_from_dict(TrainConfig, {"max_iters": "3"})
    with pytest.raises(ConfigError, match="unknown config key --bogus"):
        config_from_dict(TrainConfig, {"bogus": 1})


def test_main_exits_2_on_bad_argument(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--optimiser=mada"])
    assert exc.value.code == 2 and "did you mean --optimizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ plots, demo, sweep
def test_plots_written(tmp_path):
    train.run(tiny(tmp_path, "adamw"))
    train.run(tiny(tmp_path, "mada", optimizer="mada"))
    logs = {n: plots.read_log(tmp_path / n / "log.jsonl") for n in ("adamw", "mada")}
    assert logs["mada"]["manifest"]["config"]["optimizer"] == "mada"
    a = plots.plot_losses(logs, tmp_path / "p" / "losses.png", title="t")
    b = plots.plot_coefficients({"MADA": logs["mada"]}, tmp_path / "p" / "coefs.png")
    for p in (a, b):
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    written = plots.main([str(tmp_path / n / "log.jsonl") for n in ("adamw", "mada")] + [f"--out={tmp_path / 'cli'}"])
    assert [p.name for p in written] == ["losses.png", "coefficients.png"]


def test_demo_main_on_tiny(tmp_path, capsys):
    report = demo.main(["--model=tiny", "--max_iters=4", "--batch_size=4", "--eval_interval=2", "--log_interval=1",
                        f"--out_dir={tmp_path}", "--progress=false"])
    out = capsys.readouterr().out
    assert "| optimizer | lr | final train | final val | best train | best val | wall s | ms/step |" in out
    assert "| adamw |" in out and "| mada |" in out
    assert set(report["runs"]) == {"adamw", "mada"}
    assert report["runs"]["adamw"]["optimizer_repr"] == "torch.optim.AdamW"
    assert report["runs"]["adamw"]["initial_val_loss"] == report["runs"]["mada"]["initial_val_loss"]
    for name in ("losses.png", "mada_coefficients.png", "summary.json", "adamw/log.jsonl", "mada/ckpt.pt"):
        assert (tmp_path / name).exists()


def test_demo_lrs_are_the_sweeps_best():
    best = sweep_lr.read_best_lr()
    assert best == {"adamw": demo.ADAMW_LR, "mada": demo.MADA_LR}
    assert demo.DemoConfig().adamw_lr == demo.ADAMW_LR and demo.DemoConfig().mada_lr == demo.MADA_LR


def test_sweep_renders_table(tmp_path):
    report = sweep_lr.run(sweep_lr.SweepConfig(adamw_lrs="1e-3,3e-3", mada_lrs="1e-3", max_iters=2, progress=False,
                                               model="tiny", runs_dir=str(tmp_path), out=str(tmp_path / "s.md")))
    text = sweep_lr.render(report, "cmd")
    (tmp_path / "s.md").write_text(text)
    assert sweep_lr.read_best_lr(tmp_path / "s.md") == report["best_lr"]
    assert text.count("| adamw |") == 2 and "**best**" in text


def test_divergence_stops_the_run_and_logs_valid_json(tmp_path):
    s = train.run(tiny(tmp_path, "div", optimizer="sgd", lr=1e6, grad_clip=0.0, max_iters=20, warmup_iters=0))
    assert s["diverged"] and s["iters_done"] < 20
    recs = records(tmp_path / "div" / "log.jsonl")              # strict JSON: NaN is written as null
    assert recs[-1]["type"] == "eval" and recs[-1]["iter"] == s["iters_done"]
    assert json.loads((tmp_path / "div" / "summary.json").read_text())["diverged"] is True


class _Crashing:
    """The corpus, except that the ``n``-th training batch raises (a run killed mid-way)."""

    def __init__(self, corpus, n):
        self._corpus, self._left = corpus, n

    def __getattr__(self, name):
        return getattr(self._corpus, name)

    def get_batch(self, split, batch_size, *args):
        if split == "train" and batch_size == 4:
            self._left -= 1
            if self._left < 0:
                raise KeyboardInterrupt("simulated crash")
        return self._corpus.get_batch(split, batch_size, *args)


@pytest.mark.parametrize("optimizer,fused", [("adamw", False), ("mada", False), ("adamw", True), ("mada", True)])
def test_resume_after_a_crash_is_exact(tmp_path, optimizer, fused):
    """Float32, bit for bit; with ``fused`` MADA's checkpoint holds buffers kept at the state before
    the last update (the fused path's layout) and must resume exactly all the same."""
    from experiments.data import load_shakespeare
    kw = dict(optimizer=optimizer, max_iters=8, eval_interval=4, eval_batch_size=3,   # eval batches: not counted
              fused=fused)
    straight = train.run(tiny(tmp_path, "straight", **kw))
    cfg = tiny(tmp_path, "crashed", checkpoint_interval=3, **kw)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, corpus=_Crashing(load_shakespeare(), 7))              # dies in iteration 7
    assert train.load_checkpoint(tmp_path / "crashed" / "ckpt.pt")["iter"] == 6
    resumed = train.run(dataclasses.replace(cfg, resume=True))
    assert resumed["iters_done"] == 8 and resumed["final_val_loss"] == straight["final_val_loss"]
    assert resumed["coefficients"] == straight["coefficients"]
    a = [r for r in records(tmp_path / "straight" / "log.jsonl") if r["type"] != "manifest"]
    b = [r for r in records(tmp_path / "crashed" / "log.jsonl") if r["type"] != "manifest"]
    key = ("type", "iter", "loss", "train_loss", "val_loss", "coefficients")
    assert [{k: r.get(k) for k in key} for r in a] == [{k: r.get(k) for k in key} for r in b]
    with pytest.raises(ConfigError, match=r"lr: 0.001 -> 0.002"):
        train.run(dataclasses.replace(cfg, resume=True, lr=2e-3))
    with pytest.raises(ConfigError, match="no checkpoint"):
        train.run(tiny(tmp_path, "nothing", resume=True))


def test_sweep_reuses_finished_runs(tmp_path):
    cfg = dict(adamw_lrs="1e-3", mada_lrs="1e-3", max_iters=2, progress=False, model="tiny", runs_dir=str(tmp_path))
    first = sweep_lr.run(sweep_lr.SweepConfig(**cfg))
    mtime = (tmp_path / "adamw_lr0.001" / "log.jsonl").stat().st_mtime_ns
    again = sweep_lr.run(sweep_lr.SweepConfig(**cfg))
    assert (tmp_path / "adamw_lr0.001" / "log.jsonl").stat().st_mtime_ns == mtime     # not rerun
    assert again["results"] == first["results"]
    other = sweep_lr.run(sweep_lr.SweepConfig(**{**cfg, "max_iters": 3}))            # another config: rerun
    assert other["results"]["adamw"][0]["final_val_loss"] != first["results"]["adamw"][0]["final_val_loss"]
