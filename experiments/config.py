"""Typed training configuration and its ``--key=value`` command line.

``TrainConfig`` is a plain dataclass: every field has a type, a default and a help string, and
``__post_init__`` checks the values (a bad value is an error naming the field, never a silent fix).
``parse_config(TrainConfig, argv)`` turns ``["--optimizer=mada", "--max_iters=500"]`` into a
config; each value is converted to the field's declared type, and an unknown key, a value of the
wrong type or a key given twice is a ``ConfigError`` that names the key and the value.

Accepted forms: ``--key=value`` (``--max-iters=500`` is the same key), and for booleans a bare
``--key`` (true). Booleans read ``true/false/1/0/yes/no/on/off``; ``Optional`` fields read
``none`` as None. ``--help`` lists every field.

The parser is generic over dataclasses (``parse_config(AnyDataclass, argv)``), so other
experiment scripts can reuse it for their own configs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

__all__ = ["ConfigError", "TrainConfig", "parse_config", "parse_coefs", "config_help", "config_from_dict",
           "exit_on_config_error", "parse_and_run", "BUILTIN_OPTIMIZERS", "optimizer_names"]

T = TypeVar("T")
R = TypeVar("R")

# Optimizer names handled specially by experiments.train; any other name must be a rule of
# optimizers.RULES (or "rule:<name>" to force the fixed-coefficient RuleOptimizer of a rule).
BUILTIN_OPTIMIZERS = ("adamw", "mada", "hyperadam")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


class ConfigError(ValueError):
    """A configuration key or value that cannot be accepted; the message names the key and value."""


def _help(text: str) -> Dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything one training run of ``experiments.train`` depends on."""

    # ---- model and data
    model: str = field(default="demo", metadata=_help("GPT config name of experiments.model.CONFIGS"))
    block_size: Optional[int] = field(default=None, metadata=_help("context length (None: the model config's)"))
    n_layer: Optional[int] = field(default=None, metadata=_help("override the model config's n_layer"))
    n_head: Optional[int] = field(default=None, metadata=_help("override the model config's n_head"))
    n_embd: Optional[int] = field(default=None, metadata=_help("override the model config's n_embd"))
    dropout: Optional[float] = field(default=None, metadata=_help("override the model config's dropout"))
    batch_size: int = field(default=16, metadata=_help("sequences per micro-batch"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    # ---- optimizer
    optimizer: str = field(default="adamw", metadata=_help(
        "adamw (torch.optim.AdamW), mada (hypergrad.MADA), hyperadam (hypergrad.HyperAdam), any rule of "
        "optimizers.RULES, or rule:<name> for the fixed-coefficient RuleOptimizer of a rule"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate (after warm-up)"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("cosine floor as a fraction of lr"))
    warmup_iters: int = field(default=100, metadata=_help("linear warm-up iterations"))
    lr_decay_iters: Optional[int] = field(default=None, metadata=_help("end of the cosine (None: max_iters)"))
    weight_decay: float = field(default=0.1, metadata=_help("decoupled weight decay, on matrices only"))
    beta1: float = field(default=0.9, metadata=_help(
        "beta1 for adamw/hyperadam/mada and Adam-convention rules (initial value where learned)"))
    beta2: float = field(default=0.99, metadata=_help(
        "beta2 for adamw/hyperadam/mada and Adam-convention rules (initial value where learned)"))
    coefs: str = field(default="", metadata=_help(
        "extra optimizer coefficients as name=value,name=value (initial values for mada/hyperadam)"))
    grad_clip: float = field(default=1.0, metadata=_help("clip the global gradient norm to this (0: off)"))
    hyper_lr: float = field(default=1e-3, metadata=_help("learning rate of the hyper-level Adam (mada, hyperadam)"))
    hyper_warmup: int = field(default=0, metadata=_help("steps before hyper-learning starts (mada, hyperadam)"))
    hyper_interval: int = field(default=1, metadata=_help(
        "learn the coefficients every this many steps, the steps between run the plain rule (mada, hyperadam)"))
    clip_hypergrad: Optional[float] = field(default=None, metadata=_help("clamp each hypergradient entry"))
    fused: bool = field(default=False, metadata=_help(
        "compiled fused kernels: torch AdamW(fused=True), fused=True for mada/hyperadam and the rules (the first "
        "step compiles)"))
    # ---- run length, evaluation, logging
    max_iters: int = field(default=1000, metadata=_help("optimizer steps"))
    eval_interval: int = field(default=100, metadata=_help("evaluate train and val loss every this many iters"))
    eval_iters: int = field(default=8, metadata=_help("fixed eval batches per split"))
    eval_batch_size: int = field(default=32, metadata=_help("sequences per eval batch"))
    eval_seed: int = field(default=1234, metadata=_help("seed of the fixed eval batches (same for every run)"))
    log_interval: int = field(default=10, metadata=_help("write an iter line to the JSONL log every this many"))
    checkpoint_interval: int = field(default=0, metadata=_help("checkpoint every this many iters (0: end only)"))
    checkpoint: bool = field(default=True, metadata=_help("write checkpoints at all"))
    resume: bool = field(default=False, metadata=_help(
        "continue from out_dir/ckpt.pt (same config; progress, threads and the eval, log and checkpoint intervals "
        "may change)"))
    out_dir: str = field(default="runs/train", metadata=_help("log.jsonl, ckpt.pt and summary.json go here"))
    seed: int = field(default=1337, metadata=_help("model init, dropout and training batches"))
    threads: int = field(default=0, metadata=_help("torch.set_num_threads (0: leave as is)"))
    progress: bool = field(default=True, metadata=_help("tqdm progress bar on stderr"))

    def __post_init__(self):
        def need(cond: bool, name: str, what: str):
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be {what}")

        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "eval_batch_size",
                     "log_interval", "hyper_interval"):
            need(getattr(self, name) >= 1, name, ">= 1")
        for name in ("warmup_iters", "checkpoint_interval", "threads", "hyper_warmup"):
            need(getattr(self, name) >= 0, name, ">= 0")
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            need(v is None or v >= 1, name, ">= 1 or none")
        need(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1) or none")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "in [0, 1]")
        need(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay", ">= 0")
        need(0.0 <= self.beta1 < 1.0, "beta1", "in [0, 1)")
        need(0.0 <= self.beta2 < 1.0, "beta2", "in [0, 1)")
        need(self.grad_clip >= 0 and math.isfinite(self.grad_clip), "grad_clip", ">= 0 (0 turns clipping off)")
        need(self.hyper_lr >= 0 and math.isfinite(self.hyper_lr), "hyper_lr", ">= 0")
        need(self.clip_hypergrad is None or self.clip_hypergrad > 0, "clip_hypergrad", "> 0 or none")
        need(self.lr_decay_iters is None or self.lr_decay_iters >= 1, "lr_decay_iters", ">= 1 or none")
        need(self.optimizer in optimizer_names(), "optimizer", "one of " + ", ".join(optimizer_names()))
        need(bool(self.out_dir.strip()), "out_dir", "a non-empty path")
        parse_coefs(self.coefs)   # raises ConfigError on a malformed string

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters


def optimizer_names() -> Tuple[str, ...]:
    """Every value ``--optimizer`` accepts: the built-ins, the other rules, and ``rule:<name>`` for every rule."""
    from optimizers import RULES   # experiments -> optimizers is the allowed import direction
    rules = sorted(RULES)
    return (*BUILTIN_OPTIMIZERS, *[r for r in rules if r not in BUILTIN_OPTIMIZERS], *[f"rule:{r}" for r in rules])


# ------------------------------------------------------------------------------------------ parsing
def parse_coefs(text: str) -> Dict[str, float]:
    """``"rho=1.0,gamma=0.5"`` -> ``{"rho": 1.0, "gamma": 0.5}``; ``""`` -> ``{}``."""
    out: Dict[str, float] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ConfigError(f"coefs: {item!r} is not name=value (the whole string was {text!r})")
        if name in out:
            raise ConfigError(f"coefs: {name} given twice")
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"coefs: {name}={value!r} is not a number") from None
    return out


def _field_types(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def _unwrap_optional(tp) -> Tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, optional = _unwrap_optional(tp)
    name = getattr(base, "__name__", str(base))
    return f"{name} or none" if optional else name


def convert(key: str, text: str, tp) -> Any:
    """``text`` as a value of type ``tp`` (int, float, bool, str, or Optional of those)."""
    base, optional = _unwrap_optional(tp)
    raw = text.strip()
    if optional and raw.lower() in _NONE:
        return None
    bad = ConfigError(f"--{key}={text!r}: expected {_type_name(tp)}")
    if base is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise bad
    if base is int:
        try:
            return int(raw)
        except ValueError:
            pass
        try:  # 1e3 or 2000.0 are accepted when they are whole numbers
            f = float(raw)
        except ValueError:
            raise bad from None
        if math.isfinite(f) and f == int(f):
            return int(f)
        raise bad
    if base is float:
        try:
            return float(raw)
        except ValueError:
            raise bad from None
    if base is str:
        return text
    raise ConfigError(f"--{key}: fields of type {tp!r} cannot be set from the command line")


def _check_value(key: str, value: Any, tp) -> Any:
    """Type-check a Python value (from a dict, e.g. a checkpoint) against the field type."""
    base, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}, got bool")
    if not isinstance(value, base):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def _unknown_key(cls: type, key: str) -> ConfigError:
    known = list(_field_types(cls))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean --{close[0]}?" if close else ""
    return ConfigError(f"unknown config key --{key}{hint} (known keys: {', '.join(known)})")


def config_help(cls: type) -> str:
    lines = [f"{cls.__name__} options (--key=value):"]
    types_ = _field_types(cls)
    for f in fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        lines.append(f"  --{f.name}=<{_type_name(types_[f.name])}>  default {default!r}. {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_config(cls: Type[T], argv: Sequence[str] = (), base: Optional[T] = None) -> T:
    """Build ``cls`` from ``--key=value`` arguments on top of ``base`` (default: the class defaults).

    Raises ``ConfigError`` for an unknown key, a malformed argument, a value of the wrong type, a key
    given twice, or a value ``cls.__post_init__`` rejects. ``--help`` raises ``SystemExit(0)`` after
    printing ``config_help(cls)``.
    """
    types_ = _field_types(cls)
    values: Dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help(cls))
            raise SystemExit(0)
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"argument {arg!r}: expected --key=value")
        key, sep, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types_:
            raise _unknown_key(cls, key)
        if not sep:
            if _unwrap_optional(types_[key])[0] is bool:
                text = "true"
            else:
                raise ConfigError(f"--{key}: missing value; write --{key}=<{_type_name(types_[key])}>")
        if key in values:
            raise ConfigError(f"--{key} given twice")
        values[key] = convert(key, text, types_[key])
    start = dataclasses.asdict(base) if base is not None else {}
    try:
        return cls(**{**start, **values})
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """A ``ConfigError`` raised in the block ends the program as a usage error: ``error: <message>``
    on stderr and exit status 2, no traceback (how a script's ``main`` treats a bad option; see
    ``parse_and_run``)."""
    try:
        yield
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_and_run(cls: Type[T], run: Callable[[T], R], argv: Optional[Sequence[str]] = None) -> Tuple[T, R]:
    """``(cfg, run(cfg))`` with ``cfg`` parsed into ``cls`` from ``argv`` (default ``sys.argv[1:]``): the
    body of a script's ``main``. A ``ConfigError`` from either, a bad option or a value only the run
    can reject (an unknown model, a checkpoint that does not match), exits with status 2."""
    with exit_on_config_error():
        cfg = parse_config(cls, sys.argv[1:] if argv is None else argv)
        return cfg, run(cfg)


def config_from_dict(cls: Type[T], data: Mapping[str, Any]) -> T:
    """``cls(**data)`` with the same key and type checks as the command line (e.g. from a checkpoint)."""
    types_ = _field_types(cls)
    checked = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(cls, key)
        checked[key] = _check_value(key, value, types_[key])
    return cls(**checked)
