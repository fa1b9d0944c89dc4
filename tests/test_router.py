"""Router invariants and a hand-computed routing."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.models.router import route, update_router_bias


def _logits(t=64, e=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (t, e)) * 2.0


def test_hand_routing_softmax_top2():
  cfg = get_config("tiny", n_experts=4, n_groups=1, topk_groups=1, top_k=2)
  probs = jnp.array([[0.1, 0.4, 0.2, 0.3]])
  r = route(jnp.log(probs), None, cfg)
  np.testing.assert_array_equal(r.experts, [[1, 3]])
  chex.assert_trees_all_close(r.weights, jnp.array([[0.4, 0.3]]), rtol=1e-6)
  np.testing.assert_array_equal(r.load, [0, 1, 0, 1])
  # Renormalised and scaled: (0.4, 0.3) / 0.7 * 2.
  r2 = route(jnp.log(probs), None, cfg.replace(norm_topk_prob=True, route_scale=2.0))
  chex.assert_trees_all_close(r2.weights, jnp.array([[0.8 / 0.7, 0.6 / 0.7]]), rtol=1e-6)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_normalised_weights_sum_to_route_scale(score_func):
  cfg = get_config("tiny", score_func=score_func, norm_topk_prob=True, route_scale=2.5)
  r = route(_logits(), None, cfg)
  chex.assert_trees_all_close(r.weights.sum(-1), jnp.full((64,), 2.5), rtol=1e-5)
  chex.assert_trees_all_close(r.probs.sum(-1), jnp.ones(64), rtol=1e-5)
  assert float(r.load.sum()) == 64 * cfg.top_k


def test_group_limit_respected():
  # 8 experts in 4 groups of 2; only the best 2 groups may be used, top-3.
  cfg = get_config("tiny", n_groups=4, topk_groups=2, top_k=3)
  r = route(_logits(t=256), None, cfg)
  groups = np.asarray(r.experts) // 2                               # (T, 3)
  assert all(len(set(row)) <= 2 for row in groups)
  # and the chosen groups are the two whose best expert scores highest
  scores = np.asarray(jax.nn.softmax(_logits(t=256), -1)).reshape(256, 4, 2).max(-1)
  best = np.argsort(-scores, axis=1)[:, :2]
  for row, allowed in zip(groups, best):
    assert set(row) <= set(allowed)
  # experts are distinct per token
  assert all(len(set(row)) == 3 for row in np.asarray(r.experts))


def test_bias_changes_selection_not_weights():
  cfg = get_config("tiny", n_groups=1, topk_groups=1, score_func="sigmoid")
  logits = _logits()
  bias = jnp.array([10.0, 0, 0, 0, 0, 0, 0, 0])                    # expert 0 always chosen
  r = route(logits, bias, cfg)
  assert bool(jnp.all(jnp.any(r.experts == 0, axis=-1)))
  # weights are the *unbiased* scores of the chosen experts
  scores = jax.nn.sigmoid(logits)
  chex.assert_trees_all_close(r.weights, jnp.take_along_axis(scores, r.experts, -1))
  unbiased = route(logits, None, cfg)
  assert not np.array_equal(r.experts, unbiased.experts)


def test_bias_update_rule():
  bias = jnp.zeros(4)
  load = jnp.array([6.0, 2.0, 2.0, 2.0])                            # mean 3
  chex.assert_trees_all_close(update_router_bias(bias, load, 0.001),
                              jnp.array([-0.001, 0.001, 0.001, 0.001]))


# --- Adaptive compute: top-p and threshold routing (Huang et al., 2024) -----------

def _adaptive(k_max, **kw):
  return get_config("tiny", n_experts=4, n_groups=1, topk_groups=1, top_k=k_max, **kw)


def _used(r):
  """The experts a token uses, in slot order, and their weights."""
  experts, active = np.asarray(r.experts[0]), np.asarray(r.active[0])
  assert list(active) == sorted(active, reverse=True)                # a prefix of slots
  return list(experts[active]), np.asarray(r.weights[0])[active]


@pytest.mark.parametrize("probs,p,k_max,expected", [
    ([0.1, 0.4, 0.2, 0.3], 0.6, 3, [1, 3]),        # 0.4 < 0.6: take the next; 0.7 >= 0.6
    ([0.1, 0.4, 0.2, 0.3], 0.1, 3, [1]),           # the first expert alone reaches p
    ([0.1, 0.4, 0.2, 0.3], 0.95, 3, [1, 3, 2]),    # would need 4 (0.9 < 0.95): cap k_max
    ([0.1, 0.4, 0.2, 0.3], 0.95, 4, [1, 3, 2, 0]),
    ([0.6, 0.2, 0.1, 0.1], 0.5, 3, [0]),
    ([0.25, 0.25, 0.25, 0.25], 0.5, 4, [0, 1]),    # ties: lower index first; 0.5 reaches p
    ([0.3, 0.3, 0.3, 0.1], 0.5, 3, [0, 1]),        # ties among the first three
])
def test_topp_expert_sets_by_hand(probs, p, k_max, expected):
  r = route(jnp.log(jnp.array([probs])), None, _adaptive(k_max, routing="topp", top_p=p))
  used, weights = _used(r)
  assert used == expected
  chex.assert_trees_all_close(weights, np.array(probs)[expected], rtol=1e-6)
  assert float(jnp.sum(jnp.where(r.active, 0.0, jnp.abs(r.weights)))) == 0.0
  np.testing.assert_array_equal(r.load, np.bincount(expected, minlength=4))


@pytest.mark.parametrize("threshold,k_max,expected", [
    (0.15, 3, [1, 3, 2]), (0.25, 3, [1, 3]), (0.5, 3, [1]),          # at least one
    (0.05, 2, [1, 3]), (0.3, 3, [1])])                               # cap; strictly >
def test_threshold_expert_sets_by_hand(threshold, k_max, expected):
  probs = [0.1, 0.4, 0.2, 0.3]
  cfg = _adaptive(k_max, routing="threshold", route_threshold=threshold)
  used, weights = _used(route(jnp.log(jnp.array([probs])), None, cfg))
  assert used == expected
  chex.assert_trees_all_close(weights, np.array(probs)[expected], rtol=1e-6)
  # Renormalised over the *active* experts only.
  cfg = cfg.replace(norm_topk_prob=True, route_scale=2.0)
  _, weights = _used(route(jnp.log(jnp.array([probs])), None, cfg))
  chex.assert_trees_all_close(weights, 2 * np.array(probs)[expected]
                              / np.sum(np.array(probs)[expected]), rtol=1e-6)


def test_topp_selects_by_biased_score_measures_unbiased_mass():
  # The bias lifts expert 0 (p = 0.1) to the first slot; the mass is unbiased:
  # 0.1 before slot 2 (< 0.45: take expert 1), then 0.5 (stop). Weights unbiased.
  probs = jnp.array([[0.1, 0.4, 0.2, 0.3]])
  bias = jnp.array([1.0, 0.0, 0.0, 0.0])
  r = route(jnp.log(probs), bias, _adaptive(3, routing="topp", top_p=0.45))
  used, weights = _used(r)
  assert used == [0, 1]
  chex.assert_trees_all_close(weights, np.array([0.1, 0.4]), rtol=1e-6)


ALL_OPTIONS = [dict(), dict(score_func="sigmoid", norm_topk_prob=True, route_scale=2.5),
               dict(n_groups=4, topk_groups=2, top_k=3)]


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=["softmax", "sigmoid-norm", "groups"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("adaptive", [dict(routing="topp", top_p=1.0),
                                      dict(routing="threshold", route_threshold=0.0)])
def test_adaptive_limit_recovers_topk_exactly(options, with_bias, adaptive):
  """p = 1 (or threshold 0) with k_max = k: the same experts, weights and load."""
  cfg = get_config("tiny", **options)
  logits = _logits(t=128)
  bias = jax.random.normal(jax.random.key(3), (8,)) * 0.1 if with_bias else None
  ref = route(logits, bias, cfg)
  r = route(logits, bias, cfg.replace(**adaptive))
  assert bool(jnp.all(r.active)) and bool(jnp.all(ref.active))
  np.testing.assert_array_equal(r.experts, ref.experts)
  np.testing.assert_array_equal(r.weights, ref.weights)
  np.testing.assert_array_equal(r.load, ref.load)


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=["softmax", "sigmoid-norm", "groups"])
def test_adaptive_is_a_masked_topk(options):
  """Top-p picks the same k_max candidates as top-k and uses a prefix of them that is
  the shortest reaching p; inactive slots weigh 0 and count in no load."""
  cfg = get_config("tiny", **{"top_k": 3, **options})   # tiny: 4 groups, best 2 kept
  logits = _logits(t=256)
  bias = jax.random.normal(jax.random.key(3), (8,)) * 0.1
  ref = route(logits, bias, cfg)
  r = route(logits, bias, cfg.replace(routing="topp", top_p=0.5))
  np.testing.assert_array_equal(r.experts, ref.experts)
  active = np.asarray(r.active)
  slot_probs = np.take_along_axis(np.asarray(r.probs), np.asarray(r.experts), -1)
  n = active.sum(-1)
  assert 1 <= n.min() and n.max() <= 3 and 1 < n.mean() < 3         # really adaptive
  for row, a, count in zip(slot_probs, active, n):
    assert a[:count].all() and not a[count:].any()
    assert count == 3 or row[:count].sum() >= 0.5 - 1e-6             # reached p
    assert row[:count - 1].sum() < 0.5                                # and not before
  assert np.all(np.asarray(r.weights)[~active] == 0.0)
  np.testing.assert_array_equal(
      r.load, np.bincount(np.asarray(r.experts)[active], minlength=8))


def test_router_stats_count_only_active_slots():
  from moe_jax.models.dispatch import router_stats
  cfg = get_config("tiny", top_k=3, routing="topp", top_p=0.5)
  r = route(_logits(t=64), None, cfg)
  stats = router_stats(r, batch=4, dropped=jnp.zeros(()))
  n = np.asarray(r.active).sum(-1)                                  # (64,)
  assert float(stats["load"].sum()) == n.sum()
  np.testing.assert_array_equal(stats["seq_load"].sum(-1), n.reshape(4, 16).sum(-1))
  np.testing.assert_array_equal(stats["k_per_token"], n.reshape(4, 16))
  chex.assert_trees_all_close(stats["effective_k"], n.mean())


def test_adaptive_config_is_validated():
  with pytest.raises(ValueError, match="ModelConfig.routing='top_p'"):
    get_config("tiny", routing="top_p")
  with pytest.raises(ValueError, match=r"ModelConfig.top_p=0.0 .*\(0, 1\]"):
    get_config("tiny", top_p=0.0)
  with pytest.raises(ValueError, match=r"ModelConfig.route_threshold=1.0 .*\[0, 1\)"):
    get_config("tiny", route_threshold=1.0)


@pytest.mark.parametrize("strategy", [dict(dispatch="capacity", capacity_factor=8.0),
                                      dict(dispatch="dropless", dropless_impl="tiled"),
                                      dict(dispatch="dropless", dropless_impl="ragged")],
                         ids=["capacity", "tiled", "ragged"])
@pytest.mark.parametrize("adaptive", [
    dict(routing="topp", top_p=0.5),
    dict(routing="threshold", route_threshold=0.3, score_func="sigmoid",
         norm_topk_prob=True, router_bias=True, n_shared_experts=0)],
    ids=["topp", "threshold-sigmoid-bias"])
def test_adaptive_moe_equals_dense_reference(strategy, adaptive):
  """The MoE block with masked slots: every dispatch path computes the dense
  reference's function, forward and gradient, and the same active-only load."""
  import flax.linen as nn
  from moe_jax.models.moe import MoEBlock
  cfg = get_config("tiny", dispatch="dense", top_k=3, **adaptive)
  x = jax.random.normal(jax.random.key(0), (2, 12, cfg.d_model))
  params = nn.meta.unbox(MoEBlock(cfg).init(jax.random.key(1), x))
  # A confident router (at init it is nearly uniform and every token takes k_max).
  params["params"]["router"]["kernel"] = params["params"]["router"]["kernel"] * 40
  if cfg.router_bias:   # a non-zero bias, so that it really reorders the slots
    params["router_bias"] = jax.tree.map(
        lambda b: jax.random.normal(jax.random.key(2), b.shape) * 0.05, params["router_bias"])

  def loss(c, p, x):
    y, stats = MoEBlock(c).apply(p, x)
    return jnp.sum(jnp.sin(y)), stats

  (ref, ref_stats), ref_grads = jax.value_and_grad(
      lambda p, x: loss(cfg, p, x), argnums=(0, 1), has_aux=True)(params, x)
  other = cfg.replace(**strategy)
  (out, stats), grads = jax.value_and_grad(
      lambda p, x: loss(other, p, x), argnums=(0, 1), has_aux=True)(params, x)
  k = np.asarray(ref_stats["k_per_token"])
  assert 1 <= k.min() and k.max() <= 3 and k.min() < k.max()        # really adaptive
  chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(stats["load"], ref_stats["load"])
  assert float(stats["load"].sum()) == k.sum()
