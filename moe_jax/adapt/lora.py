"""LoRA adapters (Hu et al., 2021) as their own parameter pytree.

    W (*E, d_in, d_out)  base weight, frozen          (E: the expert axis of a
    A (*E, d_in, r)      random, trained               stacked (E, D, F) weight;
    B (*E, r, d_out)     zero at init, trained         absent for plain matrices)

    adapted(params, adapters) = params with W + (alpha / r) * A @ B on every adapted
                                matrix, computed per matrix (per expert when stacked)

Because the adapted model is just a params pytree, every model path runs it
unchanged: the three dispatch strategies, expert parallelism, sharing plans,
quantized serving, the serving engine. `merge` writes the delta into the weights
for serving at base cost; `unmerge` takes it out again. B = 0 at init, so the
adapted model starts identical to the base.

A weight is viewed as a matrix by its layout in this codebase: a routed-expert
stack "moe/w_*" (E, D, F) has one adapter per expert (A (E, D, r), B (E, r, F));
the attention output "wo" (N, H, D) maps N*H -> D; every other weight maps its
first axis to the rest (wq (D, N, H): D -> N*H; SwiGLU (D, F), (F, D)).

Dropout. PEFT drops the input of A per token, x -> dropout(x) A B, which only an
unmerged x @ A @ B forward can do. Here the delta lives in the weight, so dropout
drops rows of A (input features) for the whole step, rescaled by 1/(1-p): the
same per-feature regulariser, sampled once per step rather than per token.

Why not qwix.lora: qwix intercepts `dot_general` / `einsum` calls whose right-hand
side is a module parameter and creates the adapters inside the model's own
variables. Our routed experts multiply *gathered* per-tile weights (dispatch.py:
`w[tile_expert]`) or call `lax.ragged_dot`, neither of which qwix sees as a weight,
so it would adapt attention and dense MLPs but silently skip the routed experts,
and its adapters could not be saved, merged or swapped as a pytree of their own.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from moe_jax.config import require

# Regexes over "/"-joined parameter paths (e.g. "moe_ffn_0/moe/w_up").
TARGETS = {
    "attention": r"(^|/)attn/w[qkvo]$",
    "shared_experts": r"(^|/)shared_experts/w_(gate|up|down)$",
    "routed_experts": r"(^|/)moe/w_(gate|up|down)$",
    "dense_mlp": r"(^|/)mlp/w_(gate|up|down)$",
}
STACKED_EXPERTS = re.compile(TARGETS["routed_experts"])


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 16
  alpha: float = 32.0          # the delta is scaled by alpha / rank
  dropout: float = 0.0         # rows of A dropped per step (see the module docstring)
  targets: tuple[str, ...] = tuple(TARGETS.values())   # regexes of parameter paths

  def __post_init__(self):
    self.validate()

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def replace(self, **overrides: Any) -> "LoraConfig":
    return dataclasses.replace(self, **overrides)

  def validate(self) -> None:
    need = functools.partial(require, self)
    need(isinstance(self.rank, int) and self.rank >= 1, "rank", "must be an int >= 1")
    need(self.alpha > 0, "alpha", "must be > 0")
    need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
    need(len(self.targets) >= 1, "targets", "must name at least one regex")
    for t in self.targets:
      try:
        re.compile(t)
      except re.error as e:
        raise ValueError(f"LoraConfig.targets: {t!r} is not a valid regex ({e})") from e


def matrix_layout(path: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
  """(batch shape, d_in, d_out) of a weight seen as a (batch of) matrices."""
  if STACKED_EXPERTS.search(path) and len(shape) == 3:
    return shape[:1], shape[1], shape[2]                      # one matrix per expert
  if path.endswith("wo"):
    return (), math.prod(shape[:-1]), shape[-1]               # (N, H, D): N*H -> D
  return (), shape[0], math.prod(shape[1:])                   # (D, ...): D -> rest


def target_paths(params, cfg: LoraConfig) -> list[str]:
  """The adapted parameter paths: >= 2-D leaves matching any of `cfg.targets`."""
  flat = traverse_util.flatten_dict(params, sep="/")
  patterns = [re.compile(t) for t in cfg.targets]
  paths = [p for p, w in flat.items()
           if len(w.shape) >= 2 and any(r.search(p) for r in patterns)]
  if not paths:
    raise ValueError(f"LoraConfig.targets={cfg.targets} match no matrix of the model; "
                     f"its paths look like {sorted(flat)[:4]}")
  return sorted(paths)


def init_adapters(params, cfg: LoraConfig, rng: jax.Array):
  """{path...: {"a": (*E, d_in, r), "b": (*E, r, d_out)}} nested like `params`.
  A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's kaiming-uniform bound), B = 0."""
  flat = traverse_util.flatten_dict(params, sep="/")
  paths = target_paths(params, cfg)
  out = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    w = flat[path]
    batch, d_in, d_out = matrix_layout(path, w.shape)
    bound = 1.0 / math.sqrt(d_in)
    out[path] = {
        "a": jax.random.uniform(key, (*batch, d_in, cfg.rank), jnp.float32, -bound, bound),
        "b": jnp.zeros((*batch, cfg.rank, d_out), jnp.float32)}
  return traverse_util.unflatten_dict(out, sep="/")


def _adapter_items(adapters):
  """(path, {"a", "b"}) of every adapter in a nested adapters pytree."""
  flat = traverse_util.flatten_dict(adapters, sep="/")
  paths = sorted({p.rsplit("/", 1)[0] for p in flat})
  return [(p, {"a": flat[p + "/a"], "b": flat[p + "/b"]}) for p in paths]


def delta(adapter, shape: tuple[int, ...], scale: float, row_mask=None) -> jax.Array:
  """(alpha / r) * A @ B reshaped to the weight's shape; float32. `row_mask`
  (*E, d_in, 1) drops input rows of A (dropout)."""
  a = adapter["a"] if row_mask is None else adapter["a"] * row_mask     # (*E, d_in, r)
  ab = jnp.matmul(a, adapter["b"])                                       # (*E, d_in, d_out)
  return (scale * ab).reshape(shape)


def _combine(params, adapters, cfg: LoraConfig, sign: float, rng=None):
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for i, (path, adapter) in enumerate(_adapter_items(adapters)):
    if path not in flat:
      raise ValueError(f"adapter {path!r} has no weight in the model's params")
    w = flat[path]
    mask = None
    if rng is not None and cfg.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - cfg.dropout,
                                  adapter["a"].shape[:-1] + (1,))
      mask = keep.astype(jnp.float32) / (1.0 - cfg.dropout)             # (*E, d_in, 1)
    flat[path] = (w.astype(jnp.float32) + sign * delta(adapter, w.shape, cfg.scale, mask)
                  ).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def adapted(params, adapters, cfg: LoraConfig, rng: jax.Array | None = None):
  """The model's params with each adapted W replaced by W + (alpha/r) A @ B. Used
  inside the train step (gradients reach A and B only when `params` is frozen);
  `rng` turns on dropout."""
  return _combine(params, adapters, cfg, 1.0, rng)


def merge(params, adapters, cfg: LoraConfig):
  """Write the adapters into the base weights (serving at the base model's cost)."""
  return _combine(params, adapters, cfg, 1.0)


def unmerge(merged, adapters, cfg: LoraConfig):
  """Take the adapters out of merged weights again (W + d - d; equal to the base up
  to float rounding, exactly when the weights are float32 and d is representable)."""
  return _combine(merged, adapters, cfg, -1.0)


def adapter_size(adapters) -> int:
  """Number of adapter parameters."""
  return sum(x.size for x in jax.tree.leaves(adapters))
