"""What the small CPU experiments (``experiments.convex``, ``experiments.stacking``) share around their runs.

Each is a ``run(cfg, out=..., progress=...)`` that trains many tiny models on one torch thread and
writes one figure and ``summary.json`` into ``out``, and a ``main`` whose command line is some of the
config's fields plus ``--out`` and ``--no-progress``. Those common parts are written once, here; what
each experiment computes and draws stays in its own module.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

__all__ = ["one_thread", "save_figure", "write_outputs", "parse_with_output_options"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block, the previous count restored after: on tiny tensors
    (one element, a 64-128-10 MLP) more threads only add synchronisation (and contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_figure(fig, path: Path) -> None:
    """The end of each experiment's ``plot``: tight layout, ``path`` at 120 dpi (its folder made), figure closed."""
    import matplotlib.pyplot as plt   # the caller has chosen the backend (Agg) already

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Optional[Path], figure: str, draw: Callable[[Path], None], report: dict) -> None:
    """``draw(out / figure)`` and ``report`` as ``out / "summary.json"``, ``out`` made first; with
    ``out=None`` nothing is written (a caller that only wants the returned report)."""
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw(out / figure)
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")


def parse_with_output_options(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                              default_out: Path) -> argparse.Namespace:
    """``argv`` parsed by ``parser`` (the experiment's own options) with ``--out`` (default
    ``default_out``) and ``--no-progress`` added last."""
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)
