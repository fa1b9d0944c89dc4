"""The MoE feed-forward block: router -> dispatch -> experts -> combine.

    kernel, bias = router weights               (router.py)
    routing = top-k of the router scores        (router.py)
    y = dispatch(x, routing, expert weights)    (dispatch.py: dense, capacity, dropless)
    y += shared experts(x)                      (DeepSeekMoE: always-on experts)

On a mesh with an `expert` axis larger than one (set with `jax.set_mesh`), the
routed part runs expert-parallel instead (expert_parallel.py): tokens are routed
where they live and exchanged with all_to_all. Shared experts are one always-on
SwiGLU of width n_shared_experts * d_expert.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.models import expert_parallel
from moe_jax.models.dispatch import DISPATCH, router_stats
from moe_jax.models.layers import DenseMLP, cast, param
from moe_jax.models.router import RouterWeights, route_tokens


class MoEBlock(nn.Module):
  """x: (B, T, D) -> (y: (B, T, D), router statistics of this layer)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, t, d = x.shape
    e, f = c.n_experts, c.d_expert
    w = (param(self, "w_gate", (e, d, f), ("expert", "embed", "expert_mlp"), c),
         param(self, "w_up", (e, d, f), ("expert", "embed", "expert_mlp"), c),
         param(self, "w_down", (e, f, d), ("expert", "expert_mlp", "embed"), c))
    kernel, bias = RouterWeights(c, name="router")(d)
    w = tuple(cast(wi, dtype) for wi in w)
    if expert_parallel.expert_axis_size() > 1:
      y, stats = expert_parallel.moe_expert_parallel(x.astype(dtype), kernel, bias, w, c)
    else:
      x_flat = x.reshape(b * t, d).astype(dtype)                      # (T', D)
      routing = route_tokens(x_flat, kernel, bias, c)
      y, dropped = DISPATCH[c.dispatch](x_flat, routing, w, c)
      y, stats = y.reshape(b, t, d), router_stats(routing, b, dropped)
    if c.n_shared_experts:
      shared = DenseMLP(c, c.n_shared_experts * f, name="shared_experts")(x)
      if c.shared_expert_gate:   # Qwen2-MoE: a learned per-token gate on the shared part
        gate = param(self, "shared_gate", (d,), ("embed",), c)
        shared = shared * jax.nn.sigmoid(jnp.dot(x.astype(dtype), cast(gate, dtype)))[..., None]
      y = y + shared
    return y.astype(x.dtype), stats
