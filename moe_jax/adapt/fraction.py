"""How many parameters LoRA adds: the source's "only about 0.7% at r = 16", checked.

    one matrix (d_in, d_out):  r (d_in + d_out) / (d_in d_out)   (= 2r/d when square)
    the model:                 sum over adapted matrices of r (d_in + d_out) [x E for
                               a stacked expert weight] / total params
    per token (active):        the adapters a token passes through (k of E routed
                               experts' adapters, shared sets once per layer using
                               them) / active params (models/counting.py)

A square d x d matrix reaches 0.7% at r = 16 when d = 2 * 16 / 0.007 ~ 4,571, so the
claim describes wide models; at d_model = 2048 the attention matrices alone are at
1.6%. Counting is done on abstract shapes (jax.eval_shape), so the DeepSeek-V3
preset costs no memory.
"""
from __future__ import annotations

import dataclasses

from flax import traverse_util

from moe_jax.adapt.lora import STACKED_EXPERTS, LoraConfig, matrix_layout, target_paths
from moe_jax.config import ModelConfig
from moe_jax.models.counting import abstract_params, count_params, set_uses


def matrix_fraction(rank: int, d_in: int, d_out: int) -> float:
  """Adapter parameters over the matrix's own: r (d_in + d_out) / (d_in d_out)."""
  return rank * (d_in + d_out) / (d_in * d_out)


def square_width_for(rank: int, fraction: float) -> float:
  """The width d at which a square matrix's adapter is `fraction` of it: 2r / d."""
  return 2 * rank / fraction


@dataclasses.dataclass(frozen=True)
class LoraCount:
  adapter_total: int       # adapter parameters stored
  adapter_active: int      # adapter parameters a token passes through
  total: int               # base model, counting.py
  active: int

  @property
  def fraction_total(self) -> float:
    return self.adapter_total / self.total

  @property
  def fraction_active(self) -> float:
    return self.adapter_active / self.active


def lora_count(config: ModelConfig, lora: LoraConfig) -> LoraCount:
  params = abstract_params(config)
  flat = traverse_util.flatten_dict(params, sep="/")
  uses = set_uses(config)
  k = config.top_k
  total = active = 0
  for path in target_paths(params, lora):
    batch, d_in, d_out = matrix_layout(path, flat[path].shape)
    per_matrix = lora.rank * (d_in + d_out)
    n = batch[0] if batch else 1
    total += n * per_matrix
    applied = k if (batch and STACKED_EXPERTS.search(path)) else n   # k of E per token
    active += uses.get(path.split("/")[0], 1) * applied * per_matrix
  base = count_params(config)
  return LoraCount(adapter_total=total, adapter_active=active, total=base.total,
                   active=base.active)


def scaled(config: ModelConfig, d_model: int) -> ModelConfig:
  """`config` at another width, every hidden width scaled with d_model (heads keep
  their head_dim; their count scales)."""
  f = d_model / config.d_model
  hd = config.resolved_head_dim
  n_heads = max(1, round(config.n_heads * f))
  n_kv = max(1, min(n_heads, round(config.n_kv_heads * f)))
  while n_heads % n_kv:
    n_kv -= 1
  return config.replace(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                        d_ff=max(1, round(config.d_ff * f)),
                        d_expert=max(1, round(config.d_expert * f)))
