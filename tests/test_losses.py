"""Balance and LM losses against values computed by hand."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import losses

# Four experts; 8 assignments with counts 4, 2, 1, 1 -> f = (1/2, 1/4, 1/8, 1/8).
LOAD = jnp.array([4.0, 2.0, 1.0, 1.0])
PROB = jnp.array([0.4, 0.3, 0.2, 0.1])


def test_source_balance_loss_value():
  # mu = 1/4; f/mu - 1 = (1, 0, -1/2, -1/2); squares sum to 1.5; times alpha 0.01.
  chex.assert_trees_all_close(losses.source_balance_loss(LOAD, PROB, 0.01), 0.015)


def test_source_balance_loss_zero_at_balance_and_gradient_through_probs():
  balanced = jnp.ones(4)
  chex.assert_trees_all_close(losses.source_balance_loss(balanced, PROB, 0.01), 0.0)
  grad = jax.grad(lambda p: losses.source_balance_loss(LOAD, p, 0.01))(PROB)
  # d/dP_i = 2 alpha (f_i/mu - 1) / mu = 0.08 * (1, 0, -1/2, -1/2)
  chex.assert_trees_all_close(grad, jnp.array([0.08, 0.0, -0.04, -0.04]))


def test_switch_loss_value():
  # alpha * E * sum f_i P_i = 0.01 * 4 * (0.2 + 0.075 + 0.025 + 0.0125) = 0.0125
  chex.assert_trees_all_close(losses.switch_balance_loss(LOAD, PROB, 0.01), 0.0125)
  # At perfect balance the Switch loss equals alpha.
  chex.assert_trees_all_close(
      losses.switch_balance_loss(jnp.ones(4), jnp.full(4, 0.25), 0.01), 0.01)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_source_loss_has_the_gradient_of_switch_at_2E_alpha(score_func):
  """Through the router: the straight-through source loss at alpha and the Switch loss
  at 2 E alpha give the same gradients for the router weights and the tokens (their
  dL/dP differ by a constant, which the per-token normalisation of the scores
  removes); Switch at E alpha, the wrong factor, gives half of it."""
  from moe_jax.config import get_config
  from moe_jax.models.dispatch import router_stats
  from moe_jax.models.router import route_tokens
  cfg = get_config("tiny", n_experts=8, n_groups=1, topk_groups=1, top_k=2,
                   score_func=score_func)
  x = jax.random.normal(jax.random.key(0), (64, 16))                  # (T, D)
  kernel = jax.random.normal(jax.random.key(1), (16, 8))              # (D, E)

  def grads(kind, alpha):
    def loss(x, kernel):
      stats = router_stats(route_tokens(x, kernel, None, cfg), 4, jnp.zeros(()))
      return losses.balance_loss(jax.tree.map(lambda a: a[None], stats), kind, alpha)
    return jax.grad(loss, argnums=(0, 1))(x, kernel)

  alpha = 0.01
  matched = losses.switch_alpha_matching_source(alpha, cfg.n_experts)
  assert matched == pytest.approx(2 * 8 * alpha)
  source = grads("source", alpha)
  assert float(jnp.max(jnp.abs(source[1]))) > 1e-4       # the term acts (>> atol)
  chex.assert_trees_all_close(grads("switch", matched), source, atol=1e-7)
  chex.assert_trees_all_close(grads("switch", matched / 2),
                              jax.tree.map(lambda g: g / 2, source), atol=1e-7)
  # In dL/dP itself they differ by the constant 2 alpha E.
  load, prob = LOAD * 2, PROB
  d_source = jax.grad(lambda p: losses.source_balance_loss(load, p, alpha))(prob)
  d_switch = jax.grad(lambda p: losses.switch_balance_loss(load, p, 2 * 4 * alpha))(prob)
  chex.assert_trees_all_close(d_switch - d_source, jnp.full(4, 2 * alpha * 4), rtol=1e-6)


def test_sequence_loss_value():
  # Two sequences; the first as above, the second perfectly balanced.
  seq_load = jnp.stack([LOAD, jnp.ones(4)])
  seq_prob = jnp.stack([PROB, jnp.full(4, 0.25)])
  # seq 1: f = 4 * (1/2, 1/4, 1/8, 1/8) = (2, 1, .5, .5); sum f P = .8+.3+.1+.05 = 1.25
  # seq 2: f = 1, P = 1/4 -> 1.  Mean 1.125, times alpha.
  chex.assert_trees_all_close(losses.sequence_balance_loss(seq_load, seq_prob, 0.01),
                              0.01125)


def test_z_loss_and_dispatcher():
  chex.assert_trees_all_close(losses.router_z_loss(jnp.array([2.0, 4.0]), 0.1), 0.3)
  aux = {"load": jnp.stack([LOAD, LOAD]), "mean_prob": jnp.stack([PROB, PROB])}
  chex.assert_trees_all_close(losses.balance_loss(aux, "source", 0.01), 0.015)
  chex.assert_trees_all_close(losses.balance_loss(aux, "none", 0.01), 0.0)


def test_cross_entropy_by_hand():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))   # (1, 2, 3)
  targets = jnp.array([[0, 1]])
  loss, acc = losses.cross_entropy(logits, targets)
  chex.assert_trees_all_close(loss, (-np.log(0.5) - np.log(0.1)) / 2, rtol=1e-6)
  chex.assert_trees_all_close(acc, 0.5)
  loss_m, acc_m = losses.cross_entropy(logits, targets, mask=jnp.array([[1, 0]]))
  chex.assert_trees_all_close(loss_m, -np.log(0.5), rtol=1e-6)
  chex.assert_trees_all_close(acc_m, 1.0)


def test_router_entropy_and_dynamic_loss_by_hand():
  from moe_jax.config import get_config
  from moe_jax.models.dispatch import router_stats
  from moe_jax.models.router import route
  cfg = get_config("tiny", n_experts=3, n_groups=1, topk_groups=1, top_k=2)

  def entropy(logits):
    r = route(logits, None, cfg)
    return router_stats(r, batch=1, dropped=jnp.zeros(()))["router_entropy"]

  # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2.
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  ln2 = float(np.log(2.0))
  chex.assert_trees_all_close(entropy(logits), 1.5 * ln2, rtol=1e-6)
  # dH/dz_i = -p_i (ln p_i + H) = -(1/2 * 1/2 ln2, 1/4 * -1/2 ln2, 1/4 * -1/2 ln2).
  chex.assert_trees_all_close(jax.grad(entropy)(logits),
                              jnp.array([[-0.25 * ln2, 0.125 * ln2, 0.125 * ln2]]),
                              rtol=1e-5)
  # The loss: alpha times the mean over layers.
  chex.assert_trees_all_close(losses.router_entropy_loss(jnp.array([1.0, 2.0]), 0.1), 0.15)


def test_train_objective_adds_the_dynamic_loss():
  import flax.linen as nn
  from moe_jax.config import TrainConfig, get_config
  from moe_jax.models import Transformer
  from moe_jax.train import step
  mcfg = get_config("tiny", n_layers=2, routing="topp", top_p=0.5, top_k=3)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, mcfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  params = nn.meta.unbox(jax.jit(Transformer(mcfg).init)(jax.random.key(1),
                                                         batch["inputs"]))["params"]
  tcfg = TrainConfig(steps=2, warmup_steps=0, entropy_loss_alpha=0.5)
  loss, out = jax.jit(step.loss_fn, static_argnums=(3, 4))(params, {}, batch, mcfg, tcfg)
  expected = 0.5 * jnp.mean(out["aux"]["router_entropy"])           # (L_moe,) -> ()
  assert float(expected) > 0.5                                      # ~ ln 8 at init
  chex.assert_trees_all_close(out["entropy_loss"], expected)
  chex.assert_trees_all_close(loss, out["ce"] + out["balance"] + out["z_loss"] + expected)
