"""Multi-head latent attention: against an independent numpy reading of the DeepSeek-V2
equations, cached (absorbed) decoding against full recomputation, config checks,
parameter counts and the planner's cache size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.models.counting import count_params
from moe_jax.models.mla import MLAttention, init_mla_cache
from moe_jax.models.transformer import Transformer
from moe_jax.planner import kv_cache_bytes_per_token


def _init(config, b=2, t=12, seed=0):
  x = jax.random.normal(jax.random.key(seed), (b, t, config.d_model), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = MLAttention(config).init(jax.random.key(seed + 1), x, positions)["params"]
  params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                        is_leaf=lambda p: hasattr(p, "unbox"))
  # Non-trivial norm scales, so a missing or misplaced norm shows.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * (1.0 + 0.3 * jnp.arange(p.shape[0]) / p.shape[0])
      if "norm" in jax.tree_util.keystr(path) else p * 8.0, params)
  return {"params": params}, x, positions


def _numpy_mla(p, x, positions, c):
  """DeepSeek-V2 Sec. 2.1, eqs. (9)-(19), one head at a time, float64.
  RoPE on a vector: pairs (j, j + Dr/2) as complex numbers times exp(i pos theta_j)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  eps = c.norm_eps

  def rms(v, w):
    return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * w

  def rope(v, pos):                       # v (..., Dr), pos scalar
    half = v.shape[-1] // 2
    theta = c.rope_theta ** (-np.arange(half) / half)
    z = (v[..., :half] + 1j * v[..., half:]) * np.exp(1j * pos * theta)
    return np.concatenate([z.real, z.imag], -1)

  b, t, _ = x.shape
  dn = c.qk_nope_head_dim
  y = np.zeros_like(x)
  for bi in range(b):
    c_q = rms(x[bi] @ p["wq_a"], p["q_norm"]["scale"]) if c.q_lora_rank else x[bi]
    c_kv = rms(x[bi] @ p["wkv_a"], p["kv_norm"]["scale"])               # (T, C)
    k_r = np.stack([rope(x[bi, s] @ p["wk_rope"], positions[bi, s]) for s in range(t)])
    for h in range(c.n_heads):
      q_c = c_q @ p["wq"][:, h, :dn]                                      # (T, Dn)
      q_r = np.stack([rope(c_q[s] @ p["wq"][:, h, dn:], positions[bi, s])
                      for s in range(t)])
      q = np.concatenate([q_c, q_r], -1)
      k = np.concatenate([c_kv @ p["wk_b"][:, h], k_r], -1)
      v = c_kv @ p["wv_b"][:, h]                                          # (T, Dv)
      scores = q @ k.T / np.sqrt(q.shape[-1])
      scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      y[bi] += probs @ v @ p["wo"][h]
  return y


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_matches_numpy_equations(q_lora_rank):
  c = get_config("tiny_mla", q_lora_rank=q_lora_rank)
  variables, x, positions = _init(c)
  ours = MLAttention(c).apply(variables, x, positions)
  ref = _numpy_mla(variables["params"], x, np.asarray(positions), c)
  assert np.abs(ref).max() > 0.5        # not a trivially small output
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=1e-4)
  # The explicit-probabilities path (distillation) is the same attention.
  ours_p, probs = MLAttention(c).apply(variables, x, positions, True)
  np.testing.assert_allclose(np.asarray(ours_p), ref, atol=2e-5, rtol=1e-4)
  assert probs.shape == (2, c.n_heads, 12, 12)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_cached_decode_equals_full_recomputation(q_lora_rank):
  """Prefill 5 tokens, then decode 7 one at a time into a 16-slot latent cache whose
  unwritten slots hold garbage (a reused slot): the masked, absorbed attention over
  (c_kv, k_rope) must equal full attention over decompressed keys and values."""
  c = get_config("tiny_mla", q_lora_rank=q_lora_rank)
  variables, x, positions = _init(c)
  full = np.asarray(MLAttention(c).apply(variables, x, positions))
  cache = init_mla_cache(c, batch=2, length=16)
  assert cache["c_kv"].shape == (2, 16, c.kv_lora_rank)
  assert cache["k_rope"].shape == (2, 16, c.qk_rope_head_dim)
  cache = jax.tree.map(lambda a: a + 7.0, cache)          # leftovers must be masked
  step = jax.jit(lambda v, xs, pos, cache: MLAttention(c).apply(v, xs, pos, cache=cache))
  outs = []
  y, cache = step(variables, x[:, :5], positions[:, :5], cache)
  outs.append(y)
  for i in range(5, 12):
    y, cache = step(variables, x[:, i:i + 1], positions[:, i:i + 1], cache)
    outs.append(y)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-4)
  assert np.all(np.asarray(cache["c_kv"][:, 12:]) == 7.0)   # nothing written past 12


def test_mla_model_gradients_reach_every_projection():
  c = get_config("tiny_mla", n_layers=1)   # one dense layer: MLA is what is tested
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, c.vocab_size)
  model = Transformer(c)
  variables = model.init(jax.random.key(1), tokens)

  @jax.jit
  def loss_and_grad(params):
    return jax.value_and_grad(
        lambda p: jnp.mean(model.apply({**variables, "params": p}, tokens)[0] ** 2))(params)
  value, grads = loss_and_grad(variables["params"])
  g = grads["attn_0"]["attn"]
  for name in ("wq_a", "wq", "wkv_a", "wk_rope", "wk_b", "wv_b", "wo"):
    leaf = g[name].unbox() if hasattr(g[name], "unbox") else g[name]
    assert float(jnp.abs(leaf).sum()) > 0, name
  assert np.isfinite(float(value))


def test_config_requires_mla_dimensions():
  with pytest.raises(ValueError, match="kv_lora_rank=0 is invalid: must be >= 1"):
    get_config("tiny_mla", kv_lora_rank=0)
  with pytest.raises(ValueError, match="qk_rope_head_dim=7 .* must be even"):
    get_config("tiny_mla", qk_rope_head_dim=7)
  with pytest.raises(ValueError, match="kv_lora_rank=16 .* must be 0 unless"):
    get_config("tiny", kv_lora_rank=16)
  with pytest.raises(ValueError, match="attention='bogus' .* one of"):
    get_config("tiny", attention="bogus")
  with pytest.raises(ValueError, match="n_kv_heads=2 .* must equal n_heads"):
    get_config("tiny_mla", n_kv_heads=2)
  with pytest.raises(ValueError, match="rope_scaling='yarn' .* attention='mla' only"):
    get_config("tiny", rope_scaling="yarn")
  with pytest.raises(ValueError, match="rope_original_max_len=0 .* must be >= 1 for yarn"):
    get_config("tiny_mla", rope_scaling="yarn", rope_factor=4.0)


def test_presets_match_the_papers_counts():
  """DeepSeek-V3: 671B total, 37B activated (Sec. 1; the MTP module excluded).
  DeepSeek-V2-Lite: 15.7B total (its card says 2.4B activated; we count 2.66B with
  the input embedding and the output head, 2.45B without the input embedding)."""
  v3 = count_params(get_config("deepseek_v3"))
  assert round(v3.total / 1e9) == 671 and round(v3.active / 1e9) in (37, 38)
  lite = count_params(get_config("deepseek_v2_lite"))
  assert round(lite.total / 1e8) == 157
  emb = 102400 * 2048
  assert round(lite.active / 1e7) == 266 and round((lite.active - emb) / 1e7) == 245


def test_cache_is_latent_plus_rope_key():
  v3 = get_config("deepseek_v3")
  assert kv_cache_bytes_per_token(v3) == 61 * (512 + 64) * 2
  gqa = get_config("seed_24l")
  assert kv_cache_bytes_per_token(gqa) == 24 * 2 * 16 * 128 * 2


@pytest.mark.slow
def test_mla_train_step_sharded_matches_one_device():
  """fsdp 2 x data 2 x tensor 2: heads over `tensor`, the latent width over `fsdp`."""
  import chex
  from moe_jax import sharding
  from moe_jax.config import TrainConfig
  from moe_jax.train.step import init_state, jit_steps, state_shardings
  mcfg = get_config("tiny_mla", n_layers=1)      # one dense layer: MLA is what is tested
  tcfg = TrainConfig(steps=2, warmup_steps=1)
  tokens = jax.random.randint(jax.random.key(3), (8, 17), 0, 256)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def run(mesh):
    shardings = state_shardings(mcfg, tcfg, 16, mesh)
    state = jax.device_put(init_state(mcfg, tcfg, 16), shardings)
    step, _ = jit_steps(mcfg, tcfg, mesh, shardings)
    losses = []
    for _ in range(1):
      state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
      losses.append(float(metrics["loss"]))
    return losses, state

  ref_losses, ref_state = run(sharding.single_device_mesh())
  losses, state = run(sharding.make_mesh(data=2, fsdp=2, tensor=2))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params),
                              rtol=1e-4, atol=1e-5)
  w = state.params["attn_0"]["attn"]["wk_b"]           # (C, N, Dn): fsdp x tensor
  assert w.sharding.shard_shape(w.shape) == (8, 2, 8)
