"""Parameter counts of any config, from the abstract parameter tree (no memory used).

  total    distinct parameters stored (a set shared by six layers counts once)
  active   parameters applied to one token in one forward pass: each layer counts
           the sets it applies, routed experts count k of E, and a shared set is
           counted once per layer that applies it. This is the "activated
           parameters" of the DeepSeek papers (FLOPs per token ~ 2 * active).

Embedding and output head count in both, as DeepSeek-V3 reports them.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.kg.fusion import example_inputs
from moe_jax.models.sharing import make_plan
from moe_jax.models.transformer import Transformer

ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int
  active: int
  routed_experts: int     # part of `total` held by routed experts
  embedding: int          # embedding (+ untied output head)

  @property
  def active_fraction(self) -> float:
    return self.active / self.total


def abstract_params(config: ModelConfig):
  """The parameter tree's shapes, the knowledge-graph fusion's (GAT, gated
  injections) included when config.kg_fusion: they count in total and active."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  kg = example_inputs(config) if config.kg_fusion else None
  variables = jax.eval_shape(lambda rng, t: Transformer(config).init(rng, t, kg=kg),
                             jax.random.key(0), tokens)
  return nn.meta.unbox(variables)["params"]


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def set_uses(config: ModelConfig) -> dict[str, int]:
  """How many layers apply each parameter set ("attn_0": 6 when six layers share it)."""
  plan = make_plan(config)
  nd = config.n_dense_layers
  uses = {f"attn_{i}": plan.attn.count(i) for i in set(plan.attn)}
  uses.update({f"dense_ffn_{i}": plan.ffn[:nd].count(i) for i in set(plan.ffn[:nd])})
  uses.update({f"moe_ffn_{i}": plan.ffn[nd:].count(i) for i in set(plan.ffn[nd:])})
  return uses


def count_params(config: ModelConfig) -> ParamCount:
  params = abstract_params(config)
  uses = set_uses(config)
  k_of_e = config.top_k / config.n_experts

  total = active = routed = embedding = 0
  for name, sub in params.items():
    size = _size(sub)
    total += size
    if name in ("embed", "unembed"):
      embedding += size
      active += size
    elif name.startswith("moe_ffn_"):
      experts = _size({w: sub["moe"][w] for w in ROUTED_EXPERT_WEIGHTS})
      routed += experts
      active += uses[name] * (size - experts + experts * k_of_e)
    elif name in uses:
      active += uses[name] * size
    else:  # final norm; kg fusion (applied once per sequence, so always active)
      active += size
  return ParamCount(total=total, active=round(active), routed_experts=routed,
                    embedding=embedding)
