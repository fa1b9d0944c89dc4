"""Every dispatch strategy computes the same function as the dense reference."""
import functools
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.models import dispatch
from moe_jax.models.dispatch import DISPATCH, dispatch_capacity
from moe_jax.models.moe import MoEBlock
from moe_jax.models.router import Routing

STRATEGIES = [dict(dispatch="capacity", capacity_factor=8.0),   # large: nothing dropped
              dict(dispatch="dropless", dropless_impl="tiled"),
              dict(dispatch="dropless", dropless_impl="tiled", dropless_block=3),
              dict(dispatch="dropless", dropless_impl="ragged")]
# Adaptive routing masks slots, so the in-place buffers run as chunks that can be
# skipped (capacity 8.0 at 40 tokens: two chunks of 40 rows), not as one matmul.
MASKED = [dict(s, routing="topp") for s in STRATEGIES[:2]]


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
  # The whole block (router, groups, shared experts) through each strategy.
  cfg, x, params = _setup(dispatch="dense", **base)
  grad = lambda c: jax.jit(jax.value_and_grad(lambda p, x: _loss(c, p, x), argnums=(0, 1),
                                              has_aux=True))
  (ref, ref_stats), ref_grads = grad(cfg)(params, x)
  (out, stats), grads = grad(cfg.replace(**strategy))(params, x)
  chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(stats["load"], ref_stats["load"])
  assert float(stats["dropped"]) == 0.0


def _routing(kind: str, t: int, k: int, e: int, key) -> Routing:
  """Hand-built routings. Inactive slots get a nonzero weight and a valid expert on
  purpose: every path must ignore them."""
  k1, k2, k3 = jax.random.split(key, 3)
  experts = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(k1, t))
  active = jnp.ones((t, k), bool)
  if kind == "one_expert":                         # every token's first choice: expert 3
    experts = experts.at[:, 0].set(3).at[:, 1:].set(jnp.where(experts[:, 1:] == 3, 0,
                                                              experts[:, 1:]))
  elif kind == "empty_experts":                    # experts 4.. receive no token
    experts = jnp.stack([jnp.arange(t) % 2, 2 + jnp.arange(t) % 2], 1)[:, :k]
  elif kind == "inactive":                         # adaptive routing: some slots empty
    active = jax.random.bernoulli(k3, 0.5, (t, k)).at[:, 0].set(True)
  elif kind == "all_inactive_but_one":
    active = jnp.zeros((t, k), bool).at[0, 0].set(True)
  weights = jax.random.uniform(k2, (t, k), minval=0.1, maxval=1.0)
  return Routing(experts=experts.astype(jnp.int32), weights=weights, probs=None,
                 logits=None, load=None, active=active)


KINDS = ["random", "one_expert", "empty_experts", "inactive", "all_inactive_but_one"]


_HAND = dict(t=40, cfg=get_config("tiny", n_groups=1, topk_groups=1, capacity_factor=8.0))


@functools.lru_cache(maxsize=None)
def _hand_grad(strategy: tuple):
  """One compiled value_and_grad per strategy; the routing is an argument, so every
  kind of routing reuses it."""
  c = _HAND["cfg"].replace(**dict(strategy))

  def loss(x, w, weights, routing):
    y, dropped = DISPATCH[c.dispatch](x, routing._replace(weights=weights), w, c)
    return jnp.sum(jnp.sin(y)), (y, dropped)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("kind", KINDS)
def test_every_path_equals_dense_on_hand_built_routings(kind):
  cfg, t = _HAND["cfg"], _HAND["t"]                                  # 8 experts, top-2
  d, f, e = cfg.d_model, cfg.d_expert, cfg.n_experts
  routing = _routing(kind, t, cfg.top_k, e, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (t, d))
  w = tuple(jax.random.normal(jax.random.key(2 + i), s) * 0.3 for i, s in
            enumerate([(e, d, f), (e, d, f), (e, f, d)]))
  run = lambda strategy: _hand_grad(tuple(strategy.items()))(x, w, routing.weights, routing)
  (_, (ref, _)), ref_grads = run(dict(dispatch="dense"))
  # Inactive slots contribute nothing, not even their weight's gradient.
  np.testing.assert_array_equal(np.asarray(ref_grads[2])[~np.asarray(routing.active)], 0.0)
  for strategy in STRATEGIES + MASKED:
    (_, (out, dropped)), grads = run(strategy)
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)
    assert float(dropped) == 0.0, strategy


@pytest.mark.parametrize("routing_rule, masked", [("topp", None), ("topk", True)],
                         ids=["adaptive routing", "expert-parallel receive buffers"])
def test_dropless_skips_what_inactive_slots_leave_empty(routing_rule, masked):
  # Rows the expert function really computes, counted from inside the chunk loops:
  # three quarters of the slots inactive must cost well under the all-active routing.
  # Slots are masked by adaptive routing, or, under top-k, in the expert-parallel
  # path's receive buffers (which pass masked=True).
  cfg = get_config("tiny", n_groups=1, topk_groups=1, routing=routing_rule)
  t, d = 512, cfg.d_model
  x = jax.random.normal(jax.random.key(1), (t, d))
  w = tuple(jax.random.normal(jax.random.key(2), s) for s in
            [(8, d, 32), (8, d, 32), (8, 32, d)])
  computed = []
  base_fn = dispatch.swiglu_experts(w)

  def counting(rows, expert):
    jax.debug.callback(lambda n: computed.append(int(n)), rows.shape[0] * rows.shape[1])
    return base_fn(rows, expert)

  def rows_for(active):
    computed.clear()
    routing = _routing("random", t, 2, 8, jax.random.key(0))._replace(active=active)
    y, _ = jax.jit(lambda x: dispatch.dispatch_dropless(x, routing, w, cfg, counting,
                                                        masked=masked))(x)
    jax.block_until_ready(y)
    return sum(computed)

  full = rows_for(jnp.ones((t, 2), bool))
  quarter = rows_for(jnp.zeros((t, 2), bool).at[: t // 4].set(True))
  assert full >= t * 2                          # everything computed once at least
  assert quarter <= full // 2, (quarter, full)


def test_sort_assignments_by_hand():
  experts = jnp.array([[2, 0], [0, 1], [2, 0]])
  active = jnp.array([[True, True], [True, False], [True, True]])
  s = dispatch.sort_assignments(experts, active, 3)
  # token-major: slots (0,0)->e2 r0, (0,1)->e0 r0, (1,0)->e0 r1, (2,0)->e2 r1, (2,1)->e0 r2
  np.testing.assert_array_equal(s.counts, [3, 0, 2])
  np.testing.assert_array_equal(np.where(active, s.rank, -1), [[0, 0], [1, -1], [1, 2]])
  s = dispatch.sort_assignments(experts, active, 3, choice_major=True)
  # first choices first: (0,0) e2 r0, (1,0) e0 r0, (2,0) e2 r1, then (0,1) e0 r1, (2,1) e0 r2
  np.testing.assert_array_equal(np.where(active, s.rank, -1), [[0, 1], [0, -1], [1, 2]])


def test_tile_layout_by_hand():
  layout = dispatch.tile_layout(jnp.array([3, 0, 5]), 2, 6)
  # runs padded to [4, 0, 6] rows: expert 0 rows 0-3, expert 2 rows 4-9, tile 5 spare
  np.testing.assert_array_equal(layout.start, [0, 4, 4])
  np.testing.assert_array_equal(layout.tile_expert, [0, 0, 2, 2, 2, 2])
  assert int(layout.n_used) == 5


def test_permute_unpermute_by_hand():
  x = jnp.arange(6.0).reshape(3, 2)                             # tokens 0, 1, 2
  rows = jnp.array([[1, 4], [0, 4], [4, 2]])                    # 4 = no row
  perm = dispatch.permutation(rows, 4)
  np.testing.assert_array_equal(dispatch.permute(x, perm), [[2, 3], [0, 1], [4, 5], [0, 0]])
  y = dispatch.unpermute(10 * dispatch.permute(x, perm), perm, jnp.full((3, 2), 0.5))
  np.testing.assert_allclose(y, [[0, 5], [10, 15], [20, 25]])


@pytest.mark.parametrize("capacity, block", [(2, 3), (3, 2), (1, 1), (4, 4), (1, 4), (2, 5)])
def test_overflow_tile_bound_is_the_worst_case(capacity, block):
  # Exhaustive over every count vector of 3 experts with at most 9 slots: the bound
  # covers every one and some routing needs all of it. With block > capacity + 1 the
  # worst case spreads the overflow over every expert (the bound's n_max branch: 3
  # tiles for (1, 4), where one overflowing expert needs only 2).
  worst = max(sum(-(-max(0, c - capacity) // block) for c in counts)
              for counts in itertools.product(range(10), repeat=3) if sum(counts) <= 9)
  assert dispatch.overflow_tile_bound(9, 3, capacity, block) == worst


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


def test_shared_experts_are_always_on():
  cfg, x, params = _setup(n_shared_experts=1)
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if "shared_experts" in str(path) else a, params)
  y, _ = MoEBlock(cfg).apply(params, x)
  y0, _ = MoEBlock(cfg).apply(zeroed, x)
  assert float(jnp.abs(y - y0).max()) > 1e-4
