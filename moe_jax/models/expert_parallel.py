"""Expert parallelism: the routed experts spread over the mesh axis `expert`.

Inside one `shard_map` over the current mesh (`jax.set_mesh`), each device:

  1. routes its own tokens (router weights replicated)               (T_loc, k)
  2. packs each assignment into a send buffer for the device that owns the
     expert, at most C rows per destination                          (ep, C, D)
  3. all_to_all over `expert`: device j receives the rows meant for it
  4. runs its E/ep local experts on the received rows (dropless tiled matmul);
     with tensor parallelism each device holds a slice of the expert width and
     the partial outputs are summed over `tensor`
  5. all_to_all back, and combines the weighted outputs at their tokens.

C = ceil(ep_capacity_factor * T_loc * k / ep). With ep_capacity_factor >= ep
nothing can be dropped (C covers every assignment going to one device); smaller
factors trade a reported drop rate for smaller buffers: static shapes need a
bound, and the padded rows cost compute. The router statistics are reduced over
the batch axes, so the balance losses see the same numbers as on one device.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.config import ModelConfig
from moe_jax.models import dispatch
from moe_jax.models.router import Routing, route_tokens

EXPERT = "expert"
TENSOR = "tensor"


def expert_axis_size() -> int:
  """Size of the `expert` axis of the mesh set with `jax.set_mesh` (1 if none)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(EXPERT, 1)


def _batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in ("data", "fsdp", EXPERT) if a in mesh.axis_names)


def exchange_capacity(n_assignments: int, ep: int, config: ModelConfig) -> int:
  if config.ep_capacity_factor >= ep:
    return n_assignments
  return max(1, math.ceil(config.ep_capacity_factor * n_assignments / ep))


def _local_experts(rows, expert_ids, valid, w, config: ModelConfig, e_local: int):
  """The local experts on received rows, one slot per row; empty rows are inactive
  slots, which the dropless path skips."""
  local = config.replace(n_experts=e_local, top_k=1, n_groups=1, topk_groups=1)
  routing = Routing(experts=expert_ids[:, None], weights=valid[:, None].astype(jnp.float32),
                    probs=None, logits=None, load=None, active=valid[:, None])
  if config.dispatch == "dense":
    return dispatch.dispatch_dense(rows, routing, w, local)[0]
  return dispatch.dispatch_dropless(rows, routing, w, local, masked=True)[0]


def moe_expert_parallel(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                        w, config: ModelConfig):
  """x: (B, T, D) -> (y (B, T, D) float32, router stats as on one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  ep = dict(mesh.shape)[EXPERT]
  if config.n_experts % ep:
    raise ValueError(f"ModelConfig.n_experts={config.n_experts} must be divisible by the "
                     f"mesh's expert axis ({ep})")
  e_local = config.n_experts // ep
  batch_axes = _batch_axes(mesh)
  has_tensor = TENSOR in mesh.axis_names and dict(mesh.shape)[TENSOR] > 1

  def local(x, kernel, w_gate, w_up, w_down, *maybe_bias):
    bias = maybe_bias[0] if maybe_bias else None
    b, t, d = x.shape                                                   # local batch
    x_flat = x.reshape(b * t, d)
    routing = route_tokens(x_flat, kernel, bias, config)
    k = routing.experts.shape[1]
    cap = exchange_capacity(b * t * k, ep, config)
    # The exchange buffer is a capacity layout over devices: slot -> row dest*C + rank.
    dest = routing.experts // e_local                                   # (T, k) owner
    s = dispatch.sort_assignments(dest, routing.active, ep, choice_major=True)
    keep = routing.active & (s.rank < cap)                              # (T, k)
    perm = dispatch.permutation(jnp.where(keep, dest * cap + s.rank, ep * cap), ep * cap)
    send_x = dispatch.permute(x_flat, perm).reshape(ep, cap, d)         # (ep, C, D)
    slot = perm.row_slot[:, 0]                                          # (ep*C,)
    send_ok = (slot < b * t * k).reshape(ep, cap)                       # (ep, C)
    local_expert = jnp.append(routing.experts.reshape(-1) % e_local, 0)
    send_e = local_expert[slot].reshape(ep, cap)                        # (ep, C) int
    recv_x, recv_e, recv_ok = (jax.lax.all_to_all(a, EXPERT, 0, 0)
                               for a in (send_x, send_e, send_ok))
    y = _local_experts(recv_x.reshape(ep * cap, d), recv_e.reshape(-1),
                       recv_ok.reshape(-1), (w_gate, w_up, w_down), config, e_local)
    if has_tensor:                       # each device computed a slice of the width
      y = jax.lax.psum(y, TENSOR)
    y_back = jax.lax.all_to_all(y.reshape(ep, cap, d), EXPERT, 0, 0)
    out = dispatch.unpermute(y_back.reshape(ep * cap, d), perm, routing.weights)
    n_active = jnp.maximum(jnp.sum(routing.active), 1)
    stats = dispatch.router_stats(routing, b, (n_active - jnp.sum(keep)) / n_active)
    stats["load"] = jax.lax.psum(stats["load"], batch_axes)
    for name in ("mean_prob", "router_z", "router_entropy", "effective_k", "dropped"):
      stats[name] = jax.lax.pmean(stats[name], batch_axes)
    return out.reshape(b, t, d), stats

  tp = TENSOR if has_tensor else None
  stats_specs = {"load": P(), "mean_prob": P(), "router_z": P(), "dropped": P(),
                 "router_entropy": P(), "effective_k": P(),
                 "seq_load": P(batch_axes), "seq_prob": P(batch_axes),
                 "k_per_token": P(batch_axes)}
  bias_args = () if bias is None else (bias,)
  fn = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(batch_axes), P(), P(EXPERT, None, tp), P(EXPERT, None, tp),
                P(EXPERT, tp, None)) + (P(),) * len(bias_args),
      out_specs=(P(batch_axes), stats_specs))
  return fn(x, kernel, *w, *bias_args)
