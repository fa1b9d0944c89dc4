"""Every dispatch strategy computes the same function as the dense reference."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.models.dispatch import dispatch_capacity, dropless_tile_rows
from moe_jax.models.moe import MoEBlock
from moe_jax.models.router import Routing

STRATEGIES = [dict(dispatch="capacity", capacity_factor=8.0),   # large: nothing dropped
              dict(dispatch="dropless", dropless_impl="tiled"),
              dict(dispatch="dropless", dropless_impl="tiled", dropless_block=3),
              dict(dispatch="dropless", dropless_impl="ragged")]


def _setup(**overrides):
  cfg = get_config("tiny", **overrides)
  x = jax.random.normal(jax.random.key(0), (2, 12, cfg.d_model))
  params = nn.meta.unbox(MoEBlock(cfg).init(jax.random.key(1), x))
  return cfg, x, params


def _loss(cfg, params, x):
  y, stats = MoEBlock(cfg).apply(params, x)
  return jnp.sum(jnp.sin(y)), stats       # a non-linear read-out so gradients differ


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("base", [dict(), dict(score_func="sigmoid", norm_topk_prob=True,
                                               router_bias=True, n_shared_experts=0)])
def test_dispatch_equals_dense_forward_and_gradient(strategy, base):
  cfg, x, params = _setup(dispatch="dense", **base)
  (ref, ref_stats), ref_grads = jax.value_and_grad(
      lambda p, x: _loss(cfg, p, x), argnums=(0, 1), has_aux=True)(params, x)
  other = cfg.replace(**strategy)
  (out, stats), grads = jax.value_and_grad(
      lambda p, x: _loss(other, p, x), argnums=(0, 1), has_aux=True)(params, x)
  chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(stats["load"], ref_stats["load"])
  assert float(stats["dropped"]) == 0.0


def test_router_gets_gradient():
  cfg, x, params = _setup()
  grads = jax.grad(lambda p: _loss(cfg, p, x)[0])(params)
  assert float(jnp.abs(grads["params"]["router"]["kernel"]).sum()) > 0


def test_capacity_drops_overflow_by_priority():
  # 4 tokens, 2 experts, top-1, capacity factor 1 -> C = 2 slots per expert.
  # Three tokens want expert 0: the third (token 2) is dropped; token 3 uses expert 1.
  cfg = get_config("tiny", n_experts=2, n_groups=1, topk_groups=1, top_k=1,
                   capacity_factor=1.0, d_model=8, d_expert=4)
  routing = Routing(experts=jnp.array([[0], [0], [0], [1]]), weights=jnp.ones((4, 1)),
                    probs=None, logits=None, load=None, active=jnp.ones((4, 1), bool))
  x = jnp.arange(32.0).reshape(4, 8) / 10
  w = tuple(jax.random.normal(jax.random.key(i), s) for i, s in
            enumerate([(2, 8, 4), (2, 8, 4), (2, 4, 8)]))
  y, dropped = dispatch_capacity(x, routing, w, cfg)
  chex.assert_trees_all_close(dropped, 0.25)
  np.testing.assert_array_equal(np.asarray(y[2]), 0.0)       # dropped token: zero output
  assert np.all(np.abs(np.asarray(y)[[0, 1, 3]]).sum(-1) > 0)


def test_dropless_tile_bound():
  cfg = get_config("tiny", dropless_block=4)                 # 8 experts
  block, n_tiles = dropless_tile_rows(48, cfg)
  assert block == 4 and n_tiles == (48 + 8 * 3) // 4
  # the worst case (every expert one row over a tile) still fits
  counts = np.array([5, 5, 5, 5, 5, 5, 5, 13])
  assert sum(-(-counts // block)) <= n_tiles


def test_shared_experts_are_always_on():
  cfg, x, params = _setup(n_shared_experts=1)
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if "shared_experts" in str(path) else a, params)
  y, _ = MoEBlock(cfg).apply(params, x)
  y0, _ = MoEBlock(cfg).apply(zeroed, x)
  assert float(jnp.abs(y - y0).max()) > 1e-4
