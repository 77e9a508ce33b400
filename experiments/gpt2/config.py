"""Configuration of the GPT-2 124M recipe: one typed dataclass and named presets.

``GPT2Config()`` is the GPU recipe: nanoGPT's ``train_gpt2.py`` config (GPT-2 124M, context 1024,
~0.5M tokens per optimizer step as 12 sequences x 1024 tokens x 40 micro-batches summed over all
processes, AdamW lr 6e-4 -> 6e-5 cosine after 2000 warm-up steps, betas (0.9, 0.95), weight decay
0.1, gradient clipping 1.0, bf16 autocast, torch.compile). ``PRESETS["tiny"]`` is the same code path
shrunk for a CPU (tests, smoke runs). Command line: ``--preset=NAME`` picks the base, then any
``--key=value`` overrides a field (``experiments.config.parse_config``: typed, unknown keys are
errors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence

from experiments.config import ConfigError, parse_config

__all__ = ["GPT2Config", "PRESETS", "parse_args", "GPT2_VOCAB", "PADDED_VOCAB", "DTYPES"]

GPT2_VOCAB = 50257          # tiktoken "gpt2": 50256 BPE merges + <|endoftext|> (id 50256)
PADDED_VOCAB = 50304        # 50257 rounded up to a multiple of 64: faster matmuls, the extra rows never see a target
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _h(text: str) -> Dict[str, str]:
    return {"help": text}


@dataclass
class GPT2Config:
    """Everything one run of ``experiments.gpt2.train_gpt2`` depends on (defaults: the GPU recipe)."""

    # ---- data
    data_dir: str = field(default="data/openwebtext", metadata=_h(
        "folder with train*.bin / val*.bin uint16 token shards (prepare_owt.py)"))
    # ---- model: GPT-2 124M (experiments.model.GPT)
    vocab_size: int = field(default=PADDED_VOCAB, metadata=_h("embedding rows (>= the largest token id + 1)"))
    block_size: int = field(default=1024, metadata=_h("context length"))
    n_layer: int = field(default=12, metadata=_h("transformer blocks"))
    n_head: int = field(default=12, metadata=_h("attention heads"))
    n_embd: int = field(default=768, metadata=_h("model width"))
    dropout: float = field(default=0.0, metadata=_h("dropout (0 for pre-training)"))
    bias: bool = field(default=False, metadata=_h("biases in Linear/LayerNorm"))
    # ---- batch: tokens per optimizer step = batch_size * block_size * grad_accum
    batch_size: int = field(default=12, metadata=_h("sequences per micro-batch, per process"))
    grad_accum: int = field(default=40, metadata=_h(
        "micro-batches per optimizer step summed over ALL processes (divisible by the world size)"))
    # ---- optimizer and schedule
    optimizer: str = field(default="adamw", metadata=_h(
        "adamw (torch.optim.AdamW, fused on CUDA), mada (hypergrad.MADA), hyperadam (hypergrad.HyperAdam), "
        "or any rule of optimizers.RULES with fixed coefficients"))
    lr: float = field(default=6e-4, metadata=_h("peak learning rate"))
    min_lr: float = field(default=6e-5, metadata=_h("cosine floor"))
    warmup_iters: int = field(default=2000, metadata=_h("linear warm-up iterations"))
    lr_decay_iters: int = field(default=600_000, metadata=_h("end of the cosine decay"))
    max_iters: int = field(default=600_000, metadata=_h("optimizer steps"))
    weight_decay: float = field(default=0.1, metadata=_h("decoupled weight decay on matrices (dim >= 2) only"))
    beta1: float = field(default=0.9, metadata=_h("beta1 (initial value for mada/hyperadam)"))
    beta2: float = field(default=0.95, metadata=_h("beta2 (initial value for mada/hyperadam)"))
    grad_clip: float = field(default=1.0, metadata=_h("clip the global norm of the all-reduced gradient (0: off)"))
    hyper_lr: float = field(default=1e-3, metadata=_h("learning rate of the hyper-level Adam (mada, hyperadam)"))
    coefs: str = field(default="", metadata=_h("extra coefficients name=value,... (e.g. MADA's initial rho)"))
    # ---- evaluation and logging
    eval_interval: int = field(default=1000, metadata=_h("evaluate every this many iterations (and at the end)"))
    eval_iters: int = field(default=200, metadata=_h("fixed eval batches per split (shared out over processes)"))
    eval_only: bool = field(default=False, metadata=_h("evaluate (init_from's model) and exit"))
    log_interval: int = field(default=10, metadata=_h("log the training loss every this many iterations"))
    # ---- checkpoints
    out_dir: str = field(default="runs/gpt2", metadata=_h("log.jsonl, ckpt.pt, summary.json (rank 0 writes)"))
    init_from: str = field(default="scratch", metadata=_h("scratch, or resume (from out_dir/ckpt.pt)"))
    checkpoint: bool = field(default=True, metadata=_h("write out_dir/ckpt.pt at each evaluation and the end"))
    # ---- system
    device: str = field(default="auto", metadata=_h("auto (cuda if available), cpu, cuda"))
    dtype: str = field(default="auto", metadata=_h(
        "autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16 (with a GradScaler)"))
    compile: Optional[bool] = field(default=None, metadata=_h("torch.compile the model (none: on CUDA only)"))
    fused_optimizer: Optional[bool] = field(default=None, metadata=_h(
        "mada, hyperadam and the rules as compiled fused kernels (fused=True; none: on CUDA only). On an H100 "
        "with GPT-2 124M shapes the fused hyper-learning step ran 32 ms against 72 eagerly, and peaked about 9 "
        "parameter-sized buffers above the model against 33 (docs/performance.md, GPU rows)"))
    backend: str = field(default="auto", metadata=_h("torch.distributed backend: auto (nccl on CUDA, gloo on CPU)"))
    seed: int = field(default=1337, metadata=_h("model init and the training batches"))
    eval_seed: int = field(default=1234, metadata=_h("the fixed evaluation batches"))
    threads: int = field(default=0, metadata=_h("torch.set_num_threads per process (0: leave as is)"))
    progress: bool = field(default=True, metadata=_h("tqdm progress bar on rank 0"))

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be {what}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size", "grad_accum",
                     "max_iters", "eval_interval", "eval_iters", "log_interval", "lr_decay_iters"):
            need(getattr(self, name) >= 1, name, ">= 1")
        for name in ("warmup_iters", "threads"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.n_embd % self.n_head == 0, "n_embd", f"divisible by n_head={self.n_head}")
        need(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"in [0, lr={self.lr}]")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0.0 <= self.beta1 < 1.0, "beta1", "in [0, 1)")
        need(0.0 <= self.beta2 < 1.0, "beta2", "in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", ">= 0 (0: off)")
        need(self.hyper_lr >= 0, "hyper_lr", ">= 0")
        need(self.init_from in ("scratch", "resume"), "init_from", "scratch or resume")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", "auto, cpu or cuda")
        need(self.dtype in DTYPES, "dtype", f"one of {DTYPES}")
        need(self.backend in ("auto", "nccl", "gloo"), "backend", "auto, nccl or gloo")

    @property
    def tokens_per_iter(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum


PRESETS: Dict[str, GPT2Config] = {
    # GPT-2 124M on 8 GPUs (or fewer: grad_accum is a total, so the batch stays ~0.5M tokens) for 600k steps.
    "gpt2_124m": GPT2Config(),
    # The same code path on a laptop CPU: ~20k parameters, synthetic or real shards (tests use this one).
    "tiny": GPT2Config(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, batch_size=4, grad_accum=2,
                       lr=1e-3, min_lr=1e-4, warmup_iters=1, lr_decay_iters=100, max_iters=3, eval_interval=1000,
                       eval_iters=4, log_interval=1, device="cpu", compile=False, threads=1, out_dir="runs/gpt2_tiny"),
}


def parse_args(argv: Sequence[str] = ()) -> GPT2Config:
    """``["--preset=tiny", "--max_iters=10", ...]`` -> a config (the preset's, with the overrides applied)."""
    argv = list(argv)
    presets = [a for a in argv if a.startswith("--preset=")]
    if len(presets) > 1:
        raise ConfigError("--preset given twice")
    name = presets[0].split("=", 1)[1] if presets else "gpt2_124m"
    if name not in PRESETS:
        raise ConfigError(f"--preset={name!r}: unknown; allowed: {sorted(PRESETS)}")
    rest = [a for a in argv if not a.startswith("--preset=")]
    if any(a in ("-h", "--help") for a in rest):
        print(f"--preset=<{'|'.join(PRESETS)}>  default 'gpt2_124m'. Base configuration; --key=value overrides it.")
    return parse_config(GPT2Config, rest, base=replace(PRESETS[name]))
