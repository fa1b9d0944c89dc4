"""Typed model configuration and named presets.

One frozen dataclass describes a model. `validate()` runs on construction, so a
value out of range fails at once with an error that names the field and what is
allowed. Presets are plain functions in `PRESETS`; `get_config("small", top_k=1)`
returns a preset with overrides applied.

Every config class of the package (ModelConfig, TrainConfig, data.DataConfig,
quant.QuantConfig, distill.StageConfig) validates in two layers, both through
`require`, before anything is traced or compiled:

    field annotations --check_types--> int / float / bool / str / tuple / union / None
                                       (float finite, int in [-2**31, 2**31))
    validate()        --require------> ranges and relations between fields

`check_types` reads the dataclass annotations, so a field added later is type
checked without touching it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from typing import Any, Callable

SCORE_FUNCS = ("softmax", "sigmoid")
ROUTINGS = ("topk", "topp", "threshold")
DISPATCHES = ("dense", "capacity", "dropless")
DROPLESS_IMPLS = ("tiled", "ragged")
SHARING = ("none", "all", "cycle", "sequence", "source")
ATTENTIONS = ("gqa", "mla")
ROPE_SCALINGS = ("none", "yarn")
DTYPES = ("float32", "bfloat16", "float16")
# Every int of a config ends up in int32 index arithmetic somewhere (shapes, steps,
# seeds), so anything outside int32 is refused before it reaches jax.
INT_LIMIT = 2**31
SEED_LIMIT = 2**31
REMATS = ("none", "full", "dots", "dots_no_batch")
KG_AGGREGATIONS = ("attention", "mean")


def require(config, ok: bool, field: str, allowed: str) -> None:
  """Raise a ValueError that names the config class, the field, its value and what is
  allowed, unless `ok`. Shared by every config dataclass."""
  if not ok:
    raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)!r} is "
                     f"invalid: {allowed}")


# ---------------------------------------------------------------------------------
# The generic type check, driven by the field annotations.
# ---------------------------------------------------------------------------------

def describe_type(hint) -> str:
  """'an int', 'a tuple of str', 'a float or None', ... for error messages."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is type(None):
    return "None"
  if origin in (typing.Union, types.UnionType):
    return " or ".join(describe_type(a) for a in args)
  if origin is tuple:
    item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
    if typing.get_origin(item) is tuple and typing.get_args(item)[:1] == (str,):
      return f"a {{name: {describe_type(typing.get_args(item)[1])}}} mapping"
    if item is not None:
      plural = {str: "strings", int: "ints", float: "floats", bool: "bools"}
      return f"a tuple of {plural.get(args[0], describe_type(args[0]))}"
    return f"a tuple ({', '.join(describe_type(a) for a in args)})"
  names = {bool: "a bool (true/false)", int: "an int", float: "a finite float",
           str: "a string"}
  return names.get(hint, getattr(hint, "__name__", str(hint)))


_NO = object()   # "does not match" (None is a legitimate value)


def _coerce(value, hint):
  """`value` as type `hint` with only lossless, unsurprising conversions (an int where
  a float is expected, a list where a tuple is, numpy scalars), or `_NO`.

  Refused on purpose: bools as numbers, floats as ints (2.0 layers is a bug upstream),
  strings as bools ('false' is truthy) and a bare string as a tuple of strings (it
  would become a tuple of characters)."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is Any:
    return value
  if hint is type(None):
    return None if value is None else _NO
  if origin in (typing.Union, types.UnionType):
    for a in args:
      out = _coerce(value, a)
      if out is not _NO:
        return out
    return _NO
  if hint is bool:
    return bool(value) if type(value).__name__ in ("bool", "bool_") else _NO
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      return _NO
    value = int(value)
    return value if -INT_LIMIT <= value < INT_LIMIT else _NO
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return _NO
    try:
      value = float(value)
    except OverflowError:
      return _NO
    return value if math.isfinite(value) else _NO
  if hint is str:
    return value if isinstance(value, str) else _NO
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      return _NO
    items = (args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis
             else args)
    if len(items) != len(value):
      return _NO
    out = tuple(_coerce(v, a) for v, a in zip(value, items))
    return _NO if any(o is _NO for o in out) else out
  if isinstance(hint, type):
    return value if isinstance(value, hint) else _NO
  raise TypeError(f"check_types does not know the annotation {hint!r}; use int, "
                  "float, bool, str, None, tuple[...] or a union of those")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def check_types(config) -> None:
  """Checks every field of a (frozen) config dataclass against its annotation, and
  stores the normalised value (int -> float, list -> tuple, numpy -> Python).

  Raises the `require` ValueError naming the field, its value and the expected type."""
  hints = _hints(type(config))
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    out = _coerce(value, hints[f.name])
    if out is _NO:
      takes_int = int in (hints[f.name], *typing.get_args(hints[f.name]))
      extra = (" in [-2**31, 2**31)" if takes_int and isinstance(value, numbers.Integral)
               and not isinstance(value, bool) else "")
      require(config, False, f.name, f"expected {describe_type(hints[f.name])}{extra}")
    if out is not value:
      object.__setattr__(config, f.name, out)


def replace_fields(config, overrides: dict[str, Any]):
  """`dataclasses.replace` that names unknown fields (the shared `.replace`)."""
  names = [f.name for f in dataclasses.fields(config)]
  unknown = set(overrides) - set(names)
  if unknown:
    raise ValueError(f"unknown {type(config).__name__} field(s) {sorted(unknown)}; "
                     f"allowed: {names}")
  return dataclasses.replace(config, **overrides)


def check_int_ranges(config, ranges: dict[str, tuple[int, int]]) -> None:
  """`require(lo <= value <= hi)` for each field of `ranges` (inclusive bounds)."""
  for field, (lo, hi) in ranges.items():
    require(config, lo <= getattr(config, field) <= hi, field, f"must be in [{lo}, {hi}]")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # --- Transformer trunk -------------------------------------------------------
  vocab_size: int = 512
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4            # < n_heads gives grouped-query attention
  head_dim: int = 0              # 0 means d_model // n_heads
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  # --- Attention variant -------------------------------------------------------
  attention: str = "gqa"         # "gqa": multi-/grouped-query; "mla": DeepSeek-V2/V3
                                 # multi-head latent attention (models/mla.py)
  q_lora_rank: int = 0           # MLA: rank of the compressed query; 0: full-rank query
  kv_lora_rank: int = 0          # MLA: width of the compressed KV latent c_kv (cached)
  qk_nope_head_dim: int = 0      # MLA: per-head query/key width without rotary
  qk_rope_head_dim: int = 0      # MLA: per-head rotary width (key part shared by heads)
  v_head_dim: int = 0            # MLA: per-head value width
  rope_scaling: str = "none"     # MLA: "yarn" context extension (Peng et al., 2023), as
                                 # DeepSeek-V2/V3 checkpoints use it; the fields below
  rope_factor: float = 1.0       # yarn: context extension factor s
  rope_original_max_len: int = 0  # yarn: the pre-extension context length
  yarn_beta_fast: float = 32.0   # yarn: rotations above which a frequency is kept
  yarn_beta_slow: float = 1.0    # yarn: rotations below which it is interpolated
  yarn_mscale: float = 1.0       # yarn: cos/sin scaled by m(s, mscale) / m(s, mscale_all_dim)
  yarn_mscale_all_dim: float = 0.0  # yarn: softmax scale times m(s, this)^2; 0: none
  qkv_bias: bool = False         # biases on the q/k/v projections (Qwen2-MoE)
  qk_norm: bool = False          # RMSNorm of each query/key head before RoPE (Qwen3)
  # --- Feed-forward ------------------------------------------------------------
  n_dense_layers: int = 0        # first N layers use a dense SwiGLU (DeepSeek: 1-3)
  d_ff: int = 512                # hidden width of the dense SwiGLU layers
  # --- Mixture of experts (DeepSeekMoE / V3 router) ------------------------------
  n_experts: int = 8             # routed experts per MoE layer
  d_expert: int = 128            # hidden width of one routed expert
  n_shared_experts: int = 0      # always-on experts, each of width d_expert
  shared_expert_gate: bool = False  # scale the shared experts by sigmoid(x w) (Qwen2-MoE)
  top_k: int = 2
  n_groups: int = 1              # experts split into groups for group-limited routing
  topk_groups: int = 1           # a token may only use experts of its best groups
  score_func: str = "softmax"
  norm_topk_prob: bool = False   # renormalise the selected weights to sum to one
  route_scale: float = 1.0
  router_bias: bool = False      # aux-loss-free balancing: bias used for selection only
  # Adaptive compute (Huang et al., 2024): "topp" takes experts until their cumulative
  # probability reaches top_p, "threshold" those with probability > route_threshold;
  # both at least one and at most top_k (= k_max) experts per token.
  routing: str = "topk"
  top_p: float = 0.4             # Huang et al.'s p
  route_threshold: float = 0.2   # on the normalised router probabilities
  dispatch: str = "dropless"
  capacity_factor: float = 1.25  # for dispatch="capacity"
  dropless_impl: str = "tiled"   # "tiled" batched matmul over expert tiles, or lax.ragged_dot
  dropless_block: int = 128      # rows per tile of the tiled dropless path
  ep_capacity_factor: float = 2.0  # expert parallel: rows sent per device, x mean;
                                   # >= expert-axis size means nothing is dropped
  # --- Cross-layer parameter sharing ---------------------------------------------
  sharing: str = "none"
  share_sets: int = 2            # number of parameter sets for "cycle" / "sequence"
  share_attn_group: int = 4      # "source": attention shared in groups of N in the middle zone
  share_ffn_group: int = 2       # "source": feed-forward shared in groups of N in the middle zone
  # --- Numerics ------------------------------------------------------------------
  dtype: str = "float32"         # activations / matmul inputs
  param_dtype: str = "float32"
  init_std: float = 0.02
  # --- Memory --------------------------------------------------------------------
  remat: str = "none"            # jax.checkpoint per sublayer: "full" keeps only its input;
                                 # "dots" also its matmul outputs; "dots_no_batch" those
                                 # without batch dims (the weight matmuls)
  # --- Knowledge-graph fusion (moe_jax/kg; off: the model is unchanged) -----------
  kg_fusion: bool = False        # inject GAT entity embeddings at linked mentions
  kg_layers: tuple[int, ...] = (0,)  # inject after these layers (0-based)
  kg_dim: int = 64               # GAT width = entity embedding size
  kg_heads: int = 4              # GAT attention heads (hidden layers concatenate)
  kg_gat_layers: int = 2
  kg_relations: int = 0          # relation types of typed edges (0: untyped edges)
  kg_features: int = 256         # width of a node's hashed name features
  kg_aggregation: str = "attention"  # or "mean" (ablation: no attention)

  def __post_init__(self):
    self.validate()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  def replace(self, **overrides: Any) -> "ModelConfig":
    return replace_fields(self, overrides)

  def validate(self) -> None:
    check_types(self)
    need = functools.partial(require, self)
    # Upper bounds are far above any real model (DeepSeek-V3: d_model 7168, 256
    # experts, 129k vocabulary) and far below what overflows int32 shape arithmetic.
    check_int_ranges(self, {
        "vocab_size": (1, 2**22), "d_model": (1, 2**16), "n_layers": (1, 1024),
        "n_heads": (1, 1024), "n_kv_heads": (1, 1024), "head_dim": (0, 2**12),
        "max_seq_len": (1, 2**20), "d_ff": (1, 2**18), "n_experts": (1, 2**14),
        "d_expert": (1, 2**18), "n_shared_experts": (0, 64), "top_k": (1, 2**14),
        "n_groups": (1, 2**14), "topk_groups": (1, 2**14), "share_sets": (1, 1024),
        "share_attn_group": (1, 1024), "share_ffn_group": (1, 1024),
        "dropless_block": (1, 2**16), "n_dense_layers": (0, 1024)})
    need(self.head_dim > 0 or self.d_model % self.n_heads == 0, "n_heads",
         f"must divide d_model={self.d_model} when head_dim=0")
    need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
         f"must divide n_heads={self.n_heads}")
    need(self.resolved_head_dim % 2 == 0, "head_dim",
         f"the head width (resolved: {self.resolved_head_dim}) must be even for rotary "
         f"embeddings")
    need(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers",
         f"must be in [0, n_layers={self.n_layers}]")
    need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
    need(self.top_k <= self.n_experts, "top_k", f"must be <= n_experts={self.n_experts}")
    need(self.n_experts % self.n_groups == 0, "n_groups",
         f"must divide n_experts={self.n_experts}")
    need(self.topk_groups <= self.n_groups, "topk_groups",
         f"must be <= n_groups={self.n_groups}")
    need(self.top_k <= self.topk_groups * (self.n_experts // self.n_groups), "top_k",
         f"must be <= topk_groups * experts per group = "
         f"{self.topk_groups * (self.n_experts // self.n_groups)}")
    need(self.score_func in SCORE_FUNCS, "score_func", f"must be one of {SCORE_FUNCS}")
    need(self.routing in ROUTINGS, "routing", f"must be one of {ROUTINGS}")
    need(0 < self.top_p <= 1, "top_p", "must be in (0, 1] (a cumulative probability)")
    need(0 <= self.route_threshold < 1, "route_threshold",
         "must be in [0, 1) (a router probability)")
    need(self.dispatch in DISPATCHES, "dispatch", f"must be one of {DISPATCHES}")
    need(self.dropless_impl in DROPLESS_IMPLS, "dropless_impl",
         f"must be one of {DROPLESS_IMPLS}")
    # A capacity factor sizes buffers (tokens x factor rows): beyond 1000 it is a typo
    # that would only end in an out-of-memory error inside XLA.
    need(0 < self.capacity_factor <= 1000, "capacity_factor", "must be in (0, 1000]")
    need(0 < self.ep_capacity_factor <= 1000, "ep_capacity_factor",
         "must be in (0, 1000]")
    need(0 < self.route_scale <= 100, "route_scale", "must be in (0, 100] (V3: 2.5)")
    need(self.sharing in SHARING, "sharing", f"must be one of {SHARING}")
    need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
    need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
    need(0 < self.init_std <= 10, "init_std", "must be in (0, 10]")
    need(self.remat in REMATS, "remat", f"must be one of {REMATS}")
    need(self.rope_theta > 0, "rope_theta", "must be > 0")
    need(0 < self.norm_eps < 1, "norm_eps", "must be in (0, 1)")
    need(self.attention in ATTENTIONS, "attention", f"must be one of {ATTENTIONS}")
    mla_dims = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim")
    if self.attention == "mla":
      for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        need(getattr(self, f) >= 1, f, "must be >= 1 when attention='mla'")
      need(self.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0: full-rank queries)")
      need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
           "must be even for rotary embeddings")
      need(self.n_kv_heads == self.n_heads, "n_kv_heads",
           f"must equal n_heads={self.n_heads} with attention='mla' (every head "
           f"reads the shared latent)")
      need(not self.qkv_bias, "qkv_bias", "must be False with attention='mla'")
      need(not self.qk_norm, "qk_norm", "must be False with attention='mla'")
    else:
      for f in mla_dims:
        need(getattr(self, f) == 0, f, "is an MLA dimension: must be 0 unless "
             "attention='mla'")
    need(self.rope_scaling in ROPE_SCALINGS, "rope_scaling",
         f"must be one of {ROPE_SCALINGS}")
    need(self.rope_scaling == "none" or self.attention == "mla", "rope_scaling",
         "yarn is implemented for attention='mla' only")
    # Ranges hold whether or not yarn is on, so a bad value never waits to bite.
    need(self.rope_factor >= 1, "rope_factor", "must be >= 1")
    need(self.rope_original_max_len >= 0, "rope_original_max_len", "must be >= 0")
    need(self.yarn_beta_slow > 0, "yarn_beta_slow", "must be > 0")
    need(self.yarn_beta_fast > self.yarn_beta_slow, "yarn_beta_fast",
         f"must be > yarn_beta_slow={self.yarn_beta_slow}")
    need(self.yarn_mscale >= 0, "yarn_mscale", "must be >= 0")
    need(self.yarn_mscale_all_dim >= 0, "yarn_mscale_all_dim", "must be >= 0")
    if self.rope_scaling == "yarn":
      need(self.rope_original_max_len >= 1, "rope_original_max_len", "must be >= 1 for yarn")
    need(not self.shared_expert_gate or self.n_shared_experts >= 1, "shared_expert_gate",
         "needs n_shared_experts >= 1")
    need(isinstance(self.kg_layers, tuple) and len(self.kg_layers) >= 1
         and all(isinstance(i, int) and 0 <= i < self.n_layers for i in self.kg_layers)
         and len(set(self.kg_layers)) == len(self.kg_layers), "kg_layers",
         f"must be a non-empty tuple of distinct ints in [0, n_layers={self.n_layers})")
    for f in ("kg_dim", "kg_heads", "kg_gat_layers", "kg_features"):
      need(getattr(self, f) >= 1, f, "must be >= 1")
    need(self.kg_dim % self.kg_heads == 0, "kg_dim",
         f"must be a multiple of kg_heads={self.kg_heads} (hidden GAT layers "
         f"concatenate kg_heads heads of width kg_dim // kg_heads)")
    need(self.kg_relations >= 0, "kg_relations", "must be >= 0 (0: untyped edges)")
    need(self.kg_aggregation in KG_AGGREGATIONS, "kg_aggregation",
         f"must be one of {KG_AGGREGATIONS}")


BALANCE_LOSSES = ("none", "source", "switch", "sequence")
NONFINITE_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, objective and bookkeeping of one training run."""
  steps: int = 300
  # AdamW with the source's betas (b1=0.9, b2=0.95). The source's lr 5e-5 is for a
  # very large model at 1M-token batches; small models train well at ~1e-3.
  lr: float = 2e-3
  warmup_steps: int = 30
  min_lr_ratio: float = 0.1      # cosine decay to lr * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1      # not applied to norms, biases (1-D parameters)
  grad_clip: float = 1.0
  freeze: tuple[str, ...] = ()   # regexes of parameter paths that are not trained
  # Objective: cross-entropy + balance term + router z-loss.
  balance_loss: str = "source"
  balance_alpha: float = 0.01    # the source's alpha
  z_loss_alpha: float = 0.0
  # Huang et al.'s dynamic loss: alpha * entropy of the router distribution, so that
  # top-p routing learns confident routers instead of spreading mass over k_max experts.
  entropy_loss_alpha: float = 0.0
  bias_update_gamma: float = 1e-3  # aux-loss-free bias step (V3 uses 1e-3)
  # Bookkeeping.
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0            # 0: only at the end
  eval_batches: int = 4          # held-out batches per domain
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  # A step whose loss, gradient norm or update is not finite never changes the
  # state (so no checkpoint holds NaN); "stop" ends the run there, "skip" drops the
  # step and goes on, stopping after max_skipped_steps refusals in a row.
  on_nonfinite: str = "stop"
  max_skipped_steps: int = 10

  def __post_init__(self):
    self.validate()

  def replace(self, **overrides: Any) -> "TrainConfig":
    return replace_fields(self, overrides)

  def validate(self) -> None:
    check_types(self)
    need = functools.partial(require, self)
    need(self.steps >= 1, "steps", "must be >= 1")
    # lr and weight_decay need only be finite and positive here: a divergent value is
    # the training loop's NaN guard to catch, not a config error.
    need(self.lr > 0, "lr", "must be > 0")
    need(0 <= self.warmup_steps <= self.steps, "warmup_steps", "must be in [0, steps]")
    need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    need(0 <= self.b1 < 1, "b1", "must be in [0, 1)")
    need(0 <= self.b2 < 1, "b2", "must be in [0, 1)")
    need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(self.grad_clip > 0, "grad_clip", "must be > 0")
    need(self.balance_loss in BALANCE_LOSSES, "balance_loss",
         f"must be one of {BALANCE_LOSSES}")
    need(self.balance_alpha >= 0, "balance_alpha", "must be >= 0")
    need(self.z_loss_alpha >= 0, "z_loss_alpha", "must be >= 0")
    need(self.entropy_loss_alpha >= 0, "entropy_loss_alpha", "must be >= 0")
    need(self.bias_update_gamma >= 0, "bias_update_gamma", "must be >= 0")
    for f in ("log_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
      need(getattr(self, f) >= 1, f, "must be >= 1")
    need(self.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
    need(0 <= self.seed < SEED_LIMIT, "seed", "must be in [0, 2**31)")
    for pattern in self.freeze:
      try:
        re.compile(pattern)
        ok = bool(pattern)
      except re.error:
        ok = False
      need(ok, "freeze", f"{pattern!r} is not a non-empty regular expression "
           "(give a tuple of regexes of parameter paths, e.g. ('embed', 'attn'))")
    need(self.on_nonfinite in NONFINITE_POLICIES, "on_nonfinite",
         f"must be one of {NONFINITE_POLICIES}")
    need(self.max_skipped_steps >= 1, "max_skipped_steps", "must be >= 1")


# ---------------------------------------------------------------------------------
# Presets. Each is a function so that it reads as a plain table of numbers.
# ---------------------------------------------------------------------------------

def tiny() -> ModelConfig:
  """Unit tests: compiles in seconds, every code path on (groups, shared, dense)."""
  return ModelConfig(vocab_size=272, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                     max_seq_len=32, n_dense_layers=1, d_ff=64, n_experts=8,
                     d_expert=32, n_shared_experts=1, top_k=2, n_groups=4,
                     topk_groups=2, dropless_block=8)


def small() -> ModelConfig:
  """CPU experiments: ~3M parameters, trains on the byte-level corpus in minutes."""
  return ModelConfig(vocab_size=272, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4,
                     max_seq_len=256, n_dense_layers=0, d_ff=512, n_experts=16,
                     d_expert=128, n_shared_experts=0, top_k=2, n_groups=1,
                     topk_groups=1, dropless_block=64)


def seed_24l() -> ModelConfig:
  """The source's shape: 24 layers, 128 experts in groups of 16, top-4, its sharing
  scheme. For parameter counting and mesh planning, not for training on a CPU."""
  return ModelConfig(vocab_size=102400, d_model=2048, n_layers=24, n_heads=16,
                     n_kv_heads=16, max_seq_len=4096, n_dense_layers=0, d_ff=5632,
                     n_experts=128, d_expert=1408, n_shared_experts=0, top_k=4,
                     n_groups=8, topk_groups=4, sharing="source", tie_embeddings=False,
                     dtype="bfloat16")


def deepseek_v3() -> ModelConfig:
  """DeepSeek-V3's shape (671B total, 37B active; the MTP module not included) with
  its multi-head latent attention. For the mesh planner and parameter counting; its
  YaRN context extension is not modelled."""
  return ModelConfig(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128,
                     n_kv_heads=128, max_seq_len=4096, attention="mla", q_lora_rank=1536,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                     v_head_dim=128, n_dense_layers=3, d_ff=18432, n_experts=256,
                     d_expert=2048, n_shared_experts=1, top_k=8, n_groups=8,
                     topk_groups=4, score_func="sigmoid", norm_topk_prob=True,
                     route_scale=2.5, router_bias=True, tie_embeddings=False,
                     dtype="bfloat16")


def deepseek_v2_lite() -> ModelConfig:
  """DeepSeek-V2-Lite's shape (15.7B total, 2.4B active): MLA without query
  compression, 64 experts top-6 + 2 shared, one dense layer. The HF checkpoint
  (`python -m moe_jax.hf.convert`) fills in the rest (e.g. its rope settings)."""
  return ModelConfig(vocab_size=102400, d_model=2048, n_layers=27, n_heads=16,
                     n_kv_heads=16, max_seq_len=4096, attention="mla", q_lora_rank=0,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                     v_head_dim=128, n_dense_layers=1, d_ff=10944, n_experts=64,
                     d_expert=1408, n_shared_experts=2, top_k=6, score_func="softmax",
                     tie_embeddings=False, dtype="bfloat16")


def tiny_mla() -> ModelConfig:
  """Unit tests of multi-head latent attention: tiny() with MLA and compressed queries."""
  return tiny().replace(n_kv_heads=4, attention="mla", q_lora_rank=24, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny, "small": small, "seed_24l": seed_24l, "deepseek_v3": deepseek_v3,
    "deepseek_v2_lite": deepseek_v2_lite, "tiny_mla": tiny_mla,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
  return PRESETS[name]().replace(**overrides) if overrides else PRESETS[name]()
