"""A nanoGPT-style character GPT, and a plain MLP, for the experiments and benchmarks.

One file, read top to bottom. The GPT follows Karpathy's nanoGPT ``model.py`` (itself GPT-2):

- token embedding ``wte`` tied to the output head (``lm_head.weight is wte.weight``): fewer
  parameters, and the tied case is one that optimizers with per-tensor state must handle;
- learned position embedding ``wpe``;
- pre-LayerNorm blocks ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`` and a final ``ln_f``;
- causal self-attention through ``F.scaled_dot_product_attention(is_causal=True)`` (flash /
  memory-efficient kernels where available, no explicit mask buffer);
- GELU MLP of width 4 n_embd;
- init N(0, 0.02) for all Linear/Embedding weights, zeros for biases, and N(0, 0.02/sqrt(2 n_layer))
  for the two residual projections per block (GPT-2: keeps the residual stream's variance from
  growing with depth).

Named configurations (``CONFIGS``) give the sizes used across the project; ``build_model(name,
vocab_size)`` makes one. ``param_groups`` splits parameters the nanoGPT way: weight decay on
matrices (embeddings and Linear weights, ``dim >= 2``), none on biases and LayerNorm gains.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GPTConfig", "GPT", "MLPConfig", "MLP", "CONFIGS", "build_model", "param_groups", "count_parameters"]


# ------------------------------------------------------------------------------------------ GPT
@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 84      # characters of the offline Shakespeare corpus (experiments.data)
    block_size: int = 64      # context length; also the number of position embeddings
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False        # biases in Linear and LayerNorm: nanoGPT's default is off (a bit faster, as good)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # q, k, v for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True   # marks it for the scaled init below
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # nn.LayerNorm(bias=...) exists since torch 2.1
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: one Parameter, two uses. model.parameters() yields it once.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # LayerNorm keeps its default (weight 1, bias 0). lm_head is visited after wte and re-draws the
        # shared tensor with the same N(0, 0.02): harmless, as in nanoGPT.

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``idx``: int64 ``(B, T)`` with ``T <= block_size``. Returns ``(logits (B, T, vocab), loss)``;
        ``loss`` is the mean cross-entropy over all positions when ``targets`` is given, else None."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# ------------------------------------------------------------------------------------------ MLP
@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 1024
    hidden: int = 2048
    n_hidden_layers: int = 3      # Linear(in, hidden), then n_hidden_layers - 1 of Linear(hidden, hidden)
    out_features: int = 10
    bias: bool = True

    def __post_init__(self):
        if min(self.in_features, self.hidden, self.n_hidden_layers, self.out_features) < 1:
            raise ValueError(f"all MLPConfig sizes must be >= 1, got {self}")


class MLP(nn.Module):
    """A GELU MLP classifier: the simplest model whose optimizer step cost is all large matrices."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        widths = [config.in_features] + [config.hidden] * config.n_hidden_layers
        layers: List[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b, bias=config.bias), nn.GELU()]
        layers.append(nn.Linear(widths[-1], config.out_features, bias=config.bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, targets: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        logits = self.net(x)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss


# ------------------------------------------------------------------------------------------ configs
CONFIGS: Dict[str, Union[GPTConfig, MLPConfig]] = {
    # tests only: a few thousand parameters
    "tiny": GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16),
    # nanoGPT's CPU shakespeare-char setting: ~0.8M parameters
    "demo": GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128),
    # nanoGPT's shakespeare-char config (the MADA paper's small model): ~10.7M parameters
    "bench10m": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # ~10.5M parameters in four matrices
    "mlp10m": MLPConfig(in_features=1024, hidden=2048, n_hidden_layers=3, out_features=10),
    # GPT-2 124M shapes (vocabulary padded to 50304 as in nanoGPT): the GPU rows of the benchmark
    "gpt2_124m": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}
CONFIGS["gpt10m"] = CONFIGS["bench10m"]


def build_model(name: str, vocab_size: Optional[int] = None, **overrides) -> nn.Module:
    """The named model of ``CONFIGS``; ``vocab_size`` and ``overrides`` replace config fields (GPT only)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(CONFIGS)}")
    config = CONFIGS[name]
    if isinstance(config, GPTConfig):
        fields = asdict(config)
        if vocab_size is not None:
            overrides = {"vocab_size": vocab_size, **overrides}
        fields.update(overrides)
        return GPT(GPTConfig(**fields))
    if overrides:
        fields = asdict(config)
        fields.update(overrides)
        config = MLPConfig(**fields)
    return MLP(config)


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two param groups: ``weight_decay`` on tensors with ``dim >= 2`` (matrices, embeddings), 0 on the rest.

    Tied weights appear once (``named_parameters`` de-duplicates). Groups with no parameters are dropped.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable scalars (a tied tensor counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
