"""Smoke tests of the comparison suite and the poor-initialization grid: tiny GPT, few steps, tmp_path."""
import json

from experiments import compare, poor_init

TINY = ["--model=tiny", "--n_layer=none", "--n_embd=none", "--n_head=none", "--batch_size=4",
        "--warmup_iters=2", "--eval_interval=2", "--eval_iters=1", "--eval_batch_size=4"]


def test_compare_end_to_end(tmp_path):
    argv = [*TINY, "--optimizers=adamw,mada", "--seeds=1", "--lr_factors=1,3", "--max_iters=4", "--sweep_iters=2",
            f"--runs_dir={tmp_path / 'runs'}", f"--out={tmp_path / 'results.md'}",
            f"--images_dir={tmp_path / 'images'}", f"--poor_init_md={tmp_path / 'poor_init.md'}"]
    out = compare.main(argv)
    assert set(out["best_lr"]) == {"adamw", "mada"}
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert sum(r["phase"] == "sweep" for r in rows) == 4 and sum(r["phase"] == "main" for r in rows) == 2
    md = (tmp_path / "results.md").read_text()
    for needle in ("## Learning-rate sweep", "## Equal steps", "## Equal wall-clock", "AdamW", "MADA",
                   "final validation loss", "results_curves.png"):
        assert needle in md
    for png in ("results_curves.png", "results_final_bars.png", "results_val_vs_time.png"):
        assert (tmp_path / "images" / png).stat().st_size > 0
    # resumable: a second invocation runs nothing new
    compare.main(argv)
    assert len((tmp_path / "runs" / "results.jsonl").read_text().splitlines()) == len(rows)


def test_same_data_and_init_per_seed(tmp_path):
    cfg = compare.CompareConfig(model="tiny", n_layer=None, n_embd=None, n_head=None, batch_size=4, eval_iters=1,
                                eval_batch_size=4, eval_interval=2, warmup_iters=1)
    from experiments.data import load_shakespeare
    corpus = load_shakespeare()
    a = compare.train_one("adamw", 1e-3, 5, 2, cfg, corpus)
    b = compare.train_one("adam", 1e-3, 5, 2, cfg, corpus)
    assert a["trajectory"][0]["val_loss"] == b["trajectory"][0]["val_loss"]   # same init, same eval batches


def test_poor_init_end_to_end(tmp_path):
    argv = [*TINY, "--optimizers=adamw,mada", "--beta1s=0.7,0.9", "--beta2s=0.9", "--max_iters=3",
            f"--runs_dir={tmp_path / 'runs'}", f"--out={tmp_path / 'poor_init.md'}",
            f"--images_dir={tmp_path / 'images'}"]
    md = poor_init.main(argv)
    assert "final val loss" in md.lower() and "(0.7, 0.9)" in md
    assert (tmp_path / "images" / "poor_init_heatmaps.png").stat().st_size > 0
    assert len((tmp_path / "runs" / "results.jsonl").read_text().splitlines()) == 4
