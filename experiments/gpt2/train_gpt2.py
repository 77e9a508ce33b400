"""Train GPT-2 (124M by default) on uint16 token shards, one process per GPU with torchrun.

    # 8 GPUs on one node (OpenWebText prepared by prepare_owt.py into data/openwebtext):
    torchrun --standalone --nproc_per_node=8 -m experiments.gpt2.train_gpt2 --optimizer=adamw
    torchrun --standalone --nproc_per_node=8 -m experiments.gpt2.train_gpt2 --optimizer=mada --out_dir=runs/gpt2_mada
    # one GPU, or a CPU smoke run through the same code path:
    python -m experiments.gpt2.train_gpt2 --preset=tiny --data_dir=<folder with train*.bin, val*.bin>
    # validation loss and perplexity of a checkpoint:
    python -m experiments.gpt2.train_gpt2 --eval_only --init_from=resume --out_dir=runs/gpt2

Read top to bottom: distributed set-up, data, model, optimizer, schedule, evaluation, the loop.

Distributed (``torch.distributed``, initialised from torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``;
without them: one process, no process group). Backend nccl on CUDA, gloo on CPU. The model is
wrapped in ``DistributedDataParallel``. One optimizer step =

1. ``grad_accum / world_size`` micro-batches per process. Every micro-batch but the last runs its
   backward under ``model.no_sync()``: gradients accumulate locally and are all-reduced (averaged
   over processes) once, during the last backward. Each micro-loss is divided by the per-process
   count, so the all-reduced gradient is the mean over all ``grad_accum`` micro-batches.
2. Gradient clipping on that averaged gradient. Clipping must come after the all-reduce: the
   reference MADA code clipped each rank's gradient before averaging, which clips by the wrong
   norm (a rank's, not the batch's) and gives a different step than one process with the same
   batch. After the all-reduce every rank holds the same gradient, computes the same norm and the
   same scale, and stays in lock-step without any extra communication.
3. ``optimizer.step()`` on every rank. The optimizer is replicated: each rank applies the same
   update to the same parameters. For MADA this includes the hyper-step: its hypergradient is
   computed from the (identical) all-reduced gradient, so the learned coefficients agree too. At
   the end the script measures the largest parameter difference between ranks (``summary.json``:
   ``max_param_diff_across_ranks``, 0.0 when in sync).

Data: every micro-batch is drawn with its own generator, seeded by (seed, iteration, global
micro-batch index), and a process draws the micro-batches ``rank * n_local + k``. So the set of
sequences in one optimizer step does not depend on the number of processes: 2 processes with
``grad_accum=4`` train on exactly what 1 process with ``grad_accum=4`` does. Evaluation uses
``eval_iters`` fixed batches per split (seeded by ``eval_seed``), shared out over the processes
and all-reduced, so every evaluation of every run measures the same tokens.

Precision: bf16 autocast on CUDA by default (parameters, gradients and optimizer state stay
float32); float16 autocast uses a ``GradScaler`` (gradients are unscaled before clipping); on CPU
float32 unless ``--dtype=bfloat16``. ``--compile`` wraps the model in ``torch.compile`` (default
on CUDA). Only rank 0 writes: ``log.jsonl`` (manifest line, iteration and eval lines),
``ckpt.pt`` (state_dicts and plain values only: ``torch.load(weights_only=True)`` reads it,
written atomically) and ``summary.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import hypergrad
import optimizers
from experiments.bench_step import git_commit
from experiments.config import ConfigError, parse_coefs
from experiments.gpt2.config import GPT2Config, parse_args
from experiments.model import GPT, GPTConfig, count_parameters, param_groups

__all__ = ["Dist", "setup_distributed", "TokenShards", "build_model", "make_optimizer", "lr_at", "evaluate",
           "train", "main"]

log = logging.getLogger(__name__)

LOG_NAME, CKPT_NAME, SUMMARY_NAME = "log.jsonl", "ckpt.pt", "summary.json"
ADAM_CONVENTION = ("adam", "adamw", "amsgrad", "avgrad", "yogi", "adan", "nadam", "mada")


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: GPT2Config, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available")
        return torch.device(f"cuda:{local_rank}")
    return torch.device(cfg.device)


def setup_distributed(cfg: GPT2Config) -> Dist:
    """Join the process group that torchrun describes in the environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=resolve_device(cfg, 0))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    if cfg.grad_accum % world:
        raise ConfigError(f"grad_accum={cfg.grad_accum} must be divisible by the world size {world}")
    return Dist(rank, local_rank, world, device)


def all_reduce_mean(values: Tensor, d: Dist) -> Tensor:
    if d.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= d.world_size
    return values


# ------------------------------------------------------------------------------------------ data
class TokenShards:
    """Random windows from the uint16 shards ``<data_dir>/<split>*.bin`` (raw little-endian uint16 tokens).

    A window start is uniform over all valid starts of all shards of the split (a shard of n tokens
    offers n - block_size of them), so long and short shards are sampled in proportion to their size.
    The memmaps are re-opened for every batch (numpy memmaps otherwise keep pages referenced and
    resident memory grows over a long run, as nanoGPT notes).
    """

    def __init__(self, data_dir: os.PathLike, split: str, block_size: int):
        self.paths = sorted(Path(data_dir).glob(f"{split}*.bin"))
        if not self.paths:
            raise FileNotFoundError(f"no {split}*.bin token shards in {data_dir}; run experiments/gpt2/prepare_owt.py "
                                    f"(or write uint16 shards there)")
        self.block_size = block_size
        self.lengths = np.array([p.stat().st_size // 2 for p in self.paths], dtype=np.int64)
        starts = np.maximum(self.lengths - block_size, 0)
        if starts.sum() == 0:
            raise ValueError(f"{split} shards in {data_dir} hold {self.lengths.sum()} tokens: "
                             f"too few for block_size {block_size}")
        self.cum_starts = np.cumsum(starts)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def batch(self, batch_size: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
        """``(x, y)`` int64 ``(batch_size, block_size)``; y is x shifted by one token."""
        total = int(self.cum_starts[-1])
        picks = torch.randint(0, total, (batch_size,), generator=gen).numpy()
        shard = np.searchsorted(self.cum_starts, picks, side="right")
        offset = picks - np.concatenate([[0], self.cum_starts[:-1]])[shard]
        maps = {}
        rows = []
        for s, o in zip(shard, offset):
            if s not in maps:
                maps[s] = np.memmap(self.paths[s], dtype=np.uint16, mode="r")
            rows.append(np.asarray(maps[s][o:o + self.block_size + 1], dtype=np.int64))
        t = torch.from_numpy(np.stack(rows))
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


TRAIN_STREAM, EVAL_STREAM = 0, 1


def micro_generator(seed: int, stream: int, iteration: int, index: int) -> torch.Generator:
    """The generator of global micro-batch ``index`` of step ``iteration``: a function of these numbers only
    (not of the rank or the world size). ``stream`` keeps training and evaluation draws apart."""
    state = np.random.SeedSequence([seed, stream, iteration, index]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def to_device(batch: Tuple[Tensor, Tensor], device: torch.device) -> Tuple[Tensor, Tensor]:
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return batch


# ------------------------------------------------------------------------------------------ model, optimizer
def build_model(cfg: GPT2Config) -> GPT:
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))


def make_optimizer(cfg: GPT2Config, groups: List[dict], device: torch.device) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``groups``: torch AdamW (fused on CUDA), MADA / HyperAdam, or a fixed rule (ours
    through the fused kernels where ``cfg.fused_optimizer`` says, by default on CUDA)."""
    name, coefs = cfg.optimizer, parse_coefs(cfg.coefs)
    fused = cfg.fused_optimizer if cfg.fused_optimizer is not None else device.type == "cuda"
    betas = {"beta1": cfg.beta1, "beta2": cfg.beta2}
    if name == "adamw":
        if set(coefs) - {"eps"}:
            raise ConfigError(f"coefs={cfg.coefs!r}: torch.optim.AdamW takes only eps here")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                 fused=device.type == "cuda", **coefs)
    if name in ("mada", "hyperadam"):
        cls = hypergrad.MADA if name == "mada" else hypergrad.HyperAdam
        return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, tower=hypergrad.Level("adam", lr=cfg.hyper_lr),
                   fused=fused, **{**betas, **coefs})
    if name not in optimizers.RULES:
        raise ConfigError(f"optimizer={name!r}: unknown; allowed: adamw, mada, hyperadam, "
                          f"{', '.join(optimizers.RULES)}")
    kwargs = {**(betas if name in ADAM_CONVENTION else {}), **coefs}
    return optimizers.build_optimizer(name, groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused, **kwargs)


def lr_at(cfg: GPT2Config, it: int) -> float:
    """nanoGPT's schedule: linear warm-up to ``lr``, cosine to ``min_lr`` at ``lr_decay_iters``, then flat."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def autocast_dtype(cfg: GPT2Config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain float32."""
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: Dict[str, TokenShards], cfg: GPT2Config, d: Dist, amp) -> Dict[str, float]:
    """Mean loss over the ``eval_iters`` fixed batches of each split; batch i runs on rank i mod world_size.

    Returns ``{"train_loss", "val_loss", "val_perplexity"}`` (perplexity = exp(mean token loss)).
    """
    was_training = model.training
    model.eval()
    out = {}
    for si, (split, data) in enumerate(shards.items()):
        total = torch.zeros(2, dtype=torch.float64, device=d.device)   # (sum of batch losses, batches)
        for i in range(d.rank, cfg.eval_iters, d.world_size):
            gen = micro_generator(cfg.eval_seed, EVAL_STREAM, si, i)
            x, y = to_device(data.batch(cfg.batch_size, gen), d.device)
            with amp():
                _, loss = model(x, y)
            total[0] += loss.double()
            total[1] += 1
        if d.enabled:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        out[f"{split}_loss"] = float(total[0] / total[1])
    out["val_perplexity"] = math.exp(out["val_loss"]) if out["val_loss"] < 700 else float("inf")
    model.train(was_training)
    return out


def max_param_diff_across_ranks(model: torch.nn.Module, d: Dist) -> float:
    """Largest |param_rank - param_rank0| over all parameters and ranks (0.0 in a single process)."""
    if not d.enabled:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


# ------------------------------------------------------------------------------------------ checkpoints, logs
def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: os.PathLike, device: torch.device) -> Dict[str, Any]:
    return torch.load(path, map_location=device, weights_only=True)


def describe(opt: torch.optim.Optimizer) -> str:
    """A one-line name: repr for our optimizers, class and key settings for torch's (whose repr spans lines)."""
    if isinstance(opt, optimizers.RuleOptimizer):
        return repr(opt)
    g = opt.param_groups[0]
    return f"{type(opt).__name__}(betas={g.get('betas')}, fused={g.get('fused')}, groups={len(opt.param_groups)})"


def learned_coefficients(opt: torch.optim.Optimizer) -> Dict[str, float]:
    if isinstance(opt, hypergrad.HyperOptimizer):
        return {k: float(v) for k, v in opt.coefficients().items()}
    return {}


class JsonlLog:
    def __init__(self, path: Path, append: bool):
        self._f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------------------------ the run
def train(cfg: GPT2Config) -> Dict[str, Any]:
    """One run (all processes call it); returns the summary (rank 0 also writes it to out_dir)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = setup_distributed(cfg)
    try:
        summary = _train(cfg, d)
        if d.enabled:
            # Whatever of the run sits in reference cycles (the DDP wrapper and its reducer among it) is
            # freed now, while the group is alive, not at interpreter shutdown after it is gone: one
            # possible cause of a rank's abort at exit ("terminate called without an active
            # exception") seen once in CI and not reproduced in 10 reruns. And no rank tears the group
            # down while another still talks to it (gloo aborts on exit).
            gc.collect()
            dist.barrier()
        return summary
    finally:
        if d.enabled:
            dist.destroy_process_group()
        torch.set_num_threads(threads)


def _train(cfg: GPT2Config, d: Dist) -> Dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    if d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = d.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = autocast_dtype(cfg, device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    shards = {split: TokenShards(cfg.data_dir, split, cfg.block_size) for split in ("train", "val")}
    model = build_model(cfg).to(device)
    ckpt = None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(out_dir / CKPT_NAME, device)
        model.load_state_dict(ckpt["model"])
    raw_model = model   # the plain GPT: its state_dict has no "_orig_mod." / "module." prefixes
    opt = make_optimizer(cfg, param_groups(raw_model, cfg.weight_decay), device)
    start_iter, best_val = 0, float("inf")
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        start_iter, best_val = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if use_compile:
        model = torch.compile(model)
    eval_model = model  # evaluation bypasses DDP: no gradients, nothing to synchronise
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)

    n_local = cfg.grad_accum // d.world_size
    logger = JsonlLog(out_dir / LOG_NAME, append=ckpt is not None) if d.master else None
    if logger:
        logger.write({"type": "manifest", "config": dataclasses.asdict(cfg), "world_size": d.world_size,
                      "device": str(device), "autocast": str(amp_dtype), "compile": use_compile,
                      "n_params": count_parameters(raw_model), "tokens_per_iter": cfg.tokens_per_iter,
                      "train_tokens": shards["train"].n_tokens, "val_tokens": shards["val"].n_tokens,
                      "torch": torch.__version__, "git_commit": git_commit(), "optimizer": describe(opt),
                      "start_iter": start_iter})
        log.info("GPT %.2fM params, %d process(es), %d tokens/iter, optimizer %s, autocast %s, compile %s",
                 count_parameters(raw_model) / 1e6, d.world_size, cfg.tokens_per_iter, describe(opt), amp_dtype,
                 use_compile)

    def do_eval(it: int) -> Dict[str, float]:
        nonlocal best_val
        losses = evaluate(eval_model, shards, cfg, d, amp)
        if d.master:
            logger.write({"type": "eval", "iter": it, **losses, "coefficients": learned_coefficients(opt)})
            log.info("iter %d: train %.4f  val %.4f  val ppl %.2f", it, losses["train_loss"], losses["val_loss"],
                     losses["val_perplexity"])
        best_val = min(best_val, losses["val_loss"])
        return losses

    if cfg.eval_only:
        losses = do_eval(start_iter)
        summary = {"eval_only": True, "iter": start_iter, **losses}
        if d.master:
            (out_dir / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
            logger.close()
        return summary

    def checkpoint(it: int) -> None:
        if d.master and cfg.checkpoint:   # rank 0 only: every rank holds the same model and optimizer state
            save_checkpoint(out_dir / CKPT_NAME, {"model": raw_model.state_dict(), "optimizer": opt.state_dict(),
                                                  "config": dataclasses.asdict(cfg), "iter_num": it,
                                                  "best_val_loss": best_val})

    model.train()
    losses: Dict[str, float] = {}
    iters = range(start_iter, cfg.max_iters)
    if d.master and cfg.progress:
        from tqdm import tqdm
        iters = tqdm(iters, desc="gpt2", file=sys.stderr, initial=start_iter, total=cfg.max_iters)
    t0 = time.perf_counter()
    diverged = False
    for it in iters:
        if it % cfg.eval_interval == 0 and (it > start_iter or it == 0):
            losses = do_eval(it)
            if it > start_iter:
                checkpoint(it)
        lr = lr_at(cfg, it)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for k in range(n_local):
            index = d.rank * n_local + k                     # global micro-batch index: rank-independent data
            gen = micro_generator(cfg.seed, TRAIN_STREAM, it, index)
            x, y = to_device(shards["train"].batch(cfg.batch_size, gen), device)
            last = k == n_local - 1
            # Gradient accumulation: all-reduce only on the last micro-batch's backward.
            sync = contextlib.nullcontext() if (last or not d.enabled) else model.no_sync()
            with sync:
                with amp():
                    _, loss = model(x, y)
                scaler.scale(loss / n_local).backward()
            loss_sum += loss.detach()
        # Here DDP has averaged the gradients over all processes: clip the batch's gradient, not a rank's.
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float("nan")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if it % cfg.log_interval == 0 or it == cfg.max_iters - 1:
            train_loss = float(all_reduce_mean((loss_sum / n_local).reshape(1), d))
            if d.master:
                logger.write({"type": "iter", "iter": it, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                              "coefficients": learned_coefficients(opt),
                              "elapsed_s": time.perf_counter() - t0})
                if cfg.progress and hasattr(iters, "set_postfix"):
                    iters.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
            if not math.isfinite(train_loss):
                log.warning("non-finite training loss at iteration %d: stopping", it)
                diverged = True
                break
    wall = time.perf_counter() - t0
    final_iter = it + 1 if cfg.max_iters > start_iter else start_iter
    losses = do_eval(final_iter)
    checkpoint(final_iter)
    sync_diff = max_param_diff_across_ranks(raw_model, d)
    summary = {"iters": final_iter, "world_size": d.world_size, "diverged": diverged, **losses,
               "best_val_loss": best_val, "tokens_per_iter": cfg.tokens_per_iter,
               "train_wall_s": wall, "ms_per_iter": 1e3 * wall / max(final_iter - start_iter, 1),
               "max_param_diff_across_ranks": sync_diff, "coefficients": learned_coefficients(opt),
               "optimizer": describe(opt), "n_params": count_parameters(raw_model)}
    if d.master:
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
        logger.close()
        log.info("done: %d iters, val loss %.4f (ppl %.2f), ranks in sync: max |diff| = %g", final_iter,
                 losses["val_loss"], losses["val_perplexity"], sync_diff)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(levelname)s rank{os.environ.get('RANK', '0')} %(name)s: %(message)s")
    return train(cfg)


if __name__ == "__main__":
    main()
