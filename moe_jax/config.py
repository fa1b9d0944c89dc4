"""Typed model configuration and named presets.

One frozen dataclass describes a model. `validate()` runs on construction, so a
value out of range fails at once with an error that names the field and what is
allowed. Presets are plain functions in `PRESETS`; `get_config("small", top_k=1)`
returns a preset with overrides applied.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

SCORE_FUNCS = ("softmax", "sigmoid")
DISPATCHES = ("dense", "capacity", "dropless")
DROPLESS_IMPLS = ("tiled", "ragged")
SHARING = ("none", "all", "cycle", "sequence", "source")
DTYPES = ("float32", "bfloat16", "float16")


def require(config, ok: bool, field: str, allowed: str) -> None:
  """Raise a ValueError that names the config class, the field, its value and what is
  allowed, unless `ok`. Shared by every config dataclass."""
  if not ok:
    raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)!r} is "
                     f"invalid: {allowed}")


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
  # --- Feed-forward ------------------------------------------------------------
  n_dense_layers: int = 0        # first N layers use a dense SwiGLU (DeepSeek: 1-3)
  d_ff: int = 512                # hidden width of the dense SwiGLU layers
  # --- Mixture of experts (DeepSeekMoE / V3 router) ------------------------------
  n_experts: int = 8             # routed experts per MoE layer
  d_expert: int = 128            # hidden width of one routed expert
  n_shared_experts: int = 0      # always-on experts, each of width d_expert
  top_k: int = 2
  n_groups: int = 1              # experts split into groups for group-limited routing
  topk_groups: int = 1           # a token may only use experts of its best groups
  score_func: str = "softmax"
  norm_topk_prob: bool = False   # renormalise the selected weights to sum to one
  route_scale: float = 1.0
  router_bias: bool = False      # aux-loss-free balancing: bias used for selection only
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

  def __post_init__(self):
    self.validate()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  def replace(self, **overrides: Any) -> "ModelConfig":
    unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}; "
                       f"allowed: {[f.name for f in dataclasses.fields(self)]}")
    return dataclasses.replace(self, **overrides)

  def validate(self) -> None:
    need = functools.partial(require, self)

    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
              "max_seq_len", "d_ff", "n_experts", "d_expert", "top_k", "n_groups",
              "topk_groups", "share_sets", "share_attn_group", "share_ffn_group",
              "dropless_block"):
      need(getattr(self, f) >= 1, f, "must be >= 1")
    need(self.head_dim >= 0, "head_dim", "must be >= 0 (0 means d_model // n_heads)")
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
    need(self.dispatch in DISPATCHES, "dispatch", f"must be one of {DISPATCHES}")
    need(self.dropless_impl in DROPLESS_IMPLS, "dropless_impl",
         f"must be one of {DROPLESS_IMPLS}")
    need(self.capacity_factor > 0, "capacity_factor", "must be > 0")
    need(self.ep_capacity_factor > 0, "ep_capacity_factor", "must be > 0")
    need(self.route_scale > 0, "route_scale", "must be > 0")
    need(self.sharing in SHARING, "sharing", f"must be one of {SHARING}")
    need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
    need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
    need(self.init_std > 0, "init_std", "must be > 0")
    need(self.rope_theta > 0, "rope_theta", "must be > 0")


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
    return dataclasses.replace(self, **overrides)

  def validate(self) -> None:
    need = functools.partial(require, self)
    need(self.steps >= 1, "steps", "must be >= 1")
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
    need(self.bias_update_gamma >= 0, "bias_update_gamma", "must be >= 0")
    for f in ("log_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
      need(getattr(self, f) >= 1, f, "must be >= 1")
    need(self.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
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
  """DeepSeek-V3-like shape (671B total, ~37B active) for the mesh planner. MLA is
  approximated by GQA with 8 KV heads (its compressed KV is of similar size), so the
  attention projections, and hence the counts, differ from the paper's somewhat."""
  return ModelConfig(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128,
                     n_kv_heads=8, head_dim=128, max_seq_len=4096, n_dense_layers=3,
                     d_ff=18432, n_experts=256, d_expert=2048, n_shared_experts=1,
                     top_k=8, n_groups=8, topk_groups=4, score_func="sigmoid",
                     norm_topk_prob=True, route_scale=2.5, router_bias=True,
                     tie_embeddings=False, dtype="bfloat16")


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny, "small": small, "seed_24l": seed_24l, "deepseek_v3": deepseek_v3,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
  return PRESETS[name]().replace(**overrides) if overrides else PRESETS[name]()
