"""Inference from quantized weights, two ways.

  dequant   `dequantize_params` inside the jitted forward rebuilds float weights from
            the stored integers on every call, then the unmodified `Transformer` runs
            (weight-only quantization: what saves memory bandwidth on an accelerator).
  integer   `forward` below: the same network written as plain functions, with every
            quantized matmul computed by `int_matmul`: activations quantized per token
            to int8 (symmetric, dynamic), int8 x int8 -> int32 `lax.dot_general`,
            then one rescale per output channel (and a zero-point correction for the
            4-bit asymmetric channels). Routed experts go through dispatch.py's
            permutation API; this file supplies only the expert matmul
            (`quantized_experts`), with a tile's expert gathered from the QTensor.

`forward(..., integer=False)` runs the same functions on dequantized weights and
equals `Transformer.apply` on the fake-quantized parameters (tests pin it), so the
only difference of the integer path is activation quantization. The integer path
needs axis="output" (per-column scales factor out of the dot product) and
low_bits <= 7 (4-bit values are unpacked to int8 for the matmul).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.models import dispatch as dispatch_lib
from moe_jax.models.layers import rotary
from moe_jax.models.router import route_tokens
from moe_jax.models.sharing import make_plan
from moe_jax.quant.storage import QTensor, dequantize_matrix, is_qtensor


# ---------------------------------------------------------------------------------
# One quantized matmul
# ---------------------------------------------------------------------------------

def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row symmetric int8. x: (..., K) -> (int8 (..., K), scale (..., 1))."""
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _grouped_int_dot(xq: jax.Array, q: jax.Array, gs: int) -> jax.Array:
  """xq: (G, T, R) int8, q: (G, R, N) int8 -> (G, nG, T, N) int32 partial sums, one
  per group of `gs` rows (nG = R / gs)."""
  g, t, r = xq.shape
  xg = xq.reshape(g, t, r // gs, gs)                                  # (G, T, nG, gs)
  qg = q.reshape(g, r // gs, gs, q.shape[-1])                         # (G, nG, gs, N)
  return jax.lax.dot_general(xg, qg, (((3,), (2,)), ((0, 2), (0, 1))),
                             preferred_element_type=jnp.int32)        # (G, nG, T, N)


def int_matmul(x: jax.Array, w: QTensor) -> jax.Array:
  """y = x @ W from the stored integers. x: (G, T, R) float, w: G matrices (G, R, C)
  with axis="output" -> y: (G, T, C) float32."""
  if w.axis != "output":
    raise ValueError("the integer matmul needs QuantConfig.axis='output' (per-column "
                     "scales); use the dequant path for axis='input'")
  if w.low_bits > 7:
    raise ValueError(f"QuantConfig.low_bits={w.low_bits}: the integer matmul holds "
                     f"asymmetric values in int8, so low_bits must be <= 7")
  xq, sx = quantize_activations(x)                                    # (G, T, R), (G, T, 1)
  gs, cols = w.group_size, []
  if w.q_high is not None:
    acc = _grouped_int_dot(xq, w.q_high, gs)                          # (G, nG, T, Nh)
    cols.append(jnp.einsum("gntc,gnc->gtc", acc.astype(jnp.float32), w.s_high))
  if w.q_low is not None:
    acc = _grouped_int_dot(xq, w.low_values().astype(jnp.int8), gs)   # (G, nG, T, Nl)
    g, t, r = xq.shape
    row_sum = jnp.sum(xq.reshape(g, t, r // gs, gs).astype(jnp.int32), -1)  # (G, T, nG)
    # sum_k x_k (q_kn - z_n) = sum_k x_k q_kn - z_n sum_k x_k, still in integers.
    acc = acc - jnp.einsum("gtn,gnc->gntc", row_sum, w.z_low.astype(jnp.int32))
    cols.append(jnp.einsum("gntc,gnc->gtc", acc.astype(jnp.float32), w.s_low))
  y = jnp.concatenate(cols, axis=-1) * sx                             # (G, T, Nh + Nl)
  inverse = jnp.argsort(jnp.concatenate([w.high_idx, w.low_idx], axis=1), axis=1)
  return jnp.take_along_axis(y, inverse[:, None, :], axis=2)          # (G, T, C)


def linear(x: jax.Array, w, n_in: int, integer: bool) -> jax.Array:
  """x: (..., K) @ a weight whose first `n_in` axes are contracted -> (..., N)."""
  lead = x.shape[:-1]
  if is_qtensor(w):
    if integer:
      return int_matmul(x.reshape(1, -1, x.shape[-1]), w).reshape(*lead, -1)
    w = dequantize_matrix(w)
  k = x.shape[-1]
  return (x.reshape(-1, k) @ w.reshape(k, -1).astype(x.dtype)).reshape(*lead, -1)


def expert_matmul(x: jax.Array, w, integer: bool) -> jax.Array:
  """Per-matrix batched matmul. x: (N, R, K), w: (N, K, F) array or QTensor."""
  if is_qtensor(w):
    if integer:
      return int_matmul(x, w)
    w = dequantize_matrix(w)
  return jnp.einsum("nrk,nkf->nrf", x, w.astype(x.dtype))


# ---------------------------------------------------------------------------------
# The network as functions of a (partly) quantized params tree
# ---------------------------------------------------------------------------------

def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale).astype(x.dtype)


def attention(x, p, positions, c: ModelConfig, integer: bool):
  b, t, _ = x.shape
  hd = c.resolved_head_dim
  q = linear(x, p["wq"], 1, integer).reshape(b, t, c.n_heads, hd)     # (B, T, Nq, H)
  k = linear(x, p["wk"], 1, integer).reshape(b, t, c.n_kv_heads, hd)  # (B, T, Nkv, H)
  v = linear(x, p["wv"], 1, integer).reshape(b, t, c.n_kv_heads, hd)
  q, k = rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta)
  out = jax.nn.dot_product_attention(q.astype(x.dtype), k.astype(x.dtype),
                                     v.astype(x.dtype), is_causal=True)
  return linear(out.reshape(b, t, -1), p["wo"], 2, integer)          # (B, T, D)


def swiglu(x, p, integer: bool):
  h = jax.nn.silu(linear(x, p["w_gate"], 1, integer)) * linear(x, p["w_up"], 1, integer)
  return linear(h, p["w_down"], 1, integer)


def quantized_experts(p, integer: bool) -> dispatch_lib.ExpertFn:
  """The ExpertFn of dispatch.py on a params dict whose expert matrices may be QTensors:
  all experts in place, or each tile's expert gathered from the stored integers."""
  def experts(x, expert):
    w_gate, w_up, w_down = (p[n] if expert is None else
                            (p[n].gather(expert) if is_qtensor(p[n]) else p[n][expert])
                            for n in ("w_gate", "w_up", "w_down"))
    h = jax.nn.silu(expert_matmul(x, w_gate, integer)) * expert_matmul(x, w_up, integer)
    return expert_matmul(h.astype(x.dtype), w_down, integer)          # (N, R, D)
  return experts


def moe_block(x, p, bias, c: ModelConfig, integer: bool):
  """The MoE block through dispatch.py's permutation API; only the expert matmuls
  are quantized (dense reference, capacity or tiled dropless)."""
  if c.dispatch == "dropless" and c.dropless_impl != "tiled":
    raise ValueError(f"the quantized forward implements ModelConfig.dropless_impl="
                     f"'tiled' (ragged_dot has no integer form), not {c.dropless_impl!r}")
  b, t, d = x.shape
  x_flat = x.reshape(b * t, d)
  routing = route_tokens(x_flat, p["router"]["kernel"], bias, c)
  y, _ = dispatch_lib.DISPATCH[c.dispatch](x_flat, routing, None, c,
                                           quantized_experts(p, integer))
  if c.n_shared_experts:
    y = y + swiglu(x_flat, p["shared_experts"], integer)
  return y.astype(x.dtype).reshape(b, t, d)


def forward(qparams, tokens: jax.Array, c: ModelConfig, router_bias=None, *,
            integer: bool = True) -> jax.Array:
  """tokens (B, T) -> logits (B, T, V) float32, from a params tree whose matrices may
  be QTensors. Mirrors Transformer.__call__ (same sharing plan, same parameters)."""
  plan = make_plan(c)
  dtype = jnp.dtype(c.dtype)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  x = jnp.take(qparams["embed"], tokens, axis=0).astype(dtype)        # (B, T, D)
  for layer in range(c.n_layers):
    a = qparams[f"attn_{plan.attn[layer]}"]
    x = x + attention(rms_norm(x, a["norm"]["scale"], c.norm_eps), a["attn"],
                      positions, c, integer).astype(dtype)
    if layer < c.n_dense_layers:
      f = qparams[f"dense_ffn_{plan.ffn[layer]}"]
      y = swiglu(rms_norm(x, f["norm"]["scale"], c.norm_eps), f["mlp"], integer)
    else:
      name = f"moe_ffn_{plan.ffn[layer]}"
      f = qparams[name]
      bias = router_bias[name]["moe"]["router"]["bias"] if router_bias else None
      y = moe_block(rms_norm(x, f["norm"]["scale"], c.norm_eps), f["moe"], bias, c,
                    integer)
    x = x + y.astype(dtype)
  x = rms_norm(x, qparams["final_norm"]["scale"], c.norm_eps)
  unembed = qparams["embed"].T if c.tie_embeddings else qparams["unembed"]
  return jnp.einsum("btd,dv->btv", x, unembed.astype(dtype)).astype(jnp.float32)


# ---------------------------------------------------------------------------------
# Throughput, side by side
# ---------------------------------------------------------------------------------

def compare_throughput(fns: dict, tokens: jax.Array, *, rounds: int = 5,
                       iters: int = 3) -> dict[str, float]:
  """Tokens per second of each jitted `fn(tokens)`, compiled first, then timed in
  interleaved rounds (so background load hits every entry alike); the best round
  counts."""
  for fn in fns.values():
    jax.block_until_ready(fn(tokens))
  best = {name: float("inf") for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(iters):
        out = fn(tokens)
      jax.block_until_ready(out)
      best[name] = min(best[name], (time.perf_counter() - t0) / iters)
  return {name: tokens.size / seconds for name, seconds in best.items()}
