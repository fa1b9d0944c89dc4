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
