"""The decoder LM: shapes, one trace per jit, causality, gradient flow, counts."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.models import Transformer, moe_layer_sets
from moe_jax.models.counting import count_params


def _init(cfg, batch=2, length=16):
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, cfg.vocab_size)
  return tokens, nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(1), tokens))


def test_shapes_and_aux():
  cfg = get_config("tiny")
  tokens, variables = _init(cfg)
  logits, aux = jax.jit(Transformer(cfg).apply)(variables, tokens)
  chex.assert_shape(logits, (2, 16, cfg.vocab_size))
  chex.assert_shape(aux["load"], (cfg.n_moe_layers, cfg.n_experts))
  chex.assert_shape(aux["seq_load"], (cfg.n_moe_layers, 2, cfg.n_experts))
  np.testing.assert_allclose(aux["load"].sum(-1), 2 * 16 * cfg.top_k)
  assert moe_layer_sets(cfg) == ["moe_ffn_0", "moe_ffn_1"]


def test_jitted_forward_traces_once():
  cfg = get_config("tiny")
  tokens, variables = _init(cfg)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(variables, tokens):
    return Transformer(cfg).apply(variables, tokens)[0]

  for step in range(3):
    forward(variables, (tokens + step) % cfg.vocab_size).block_until_ready()


def test_causal():
  cfg = get_config("tiny", dispatch="dense")
  tokens, variables = _init(cfg)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % cfg.vocab_size)
  apply = jax.jit(Transformer(cfg).apply)
  a, _ = apply(variables, tokens)
  b, _ = apply(variables, changed)
  chex.assert_trees_all_close(a[:, :10], b[:, :10], atol=1e-6)
  assert float(jnp.abs(a[:, 10:] - b[:, 10:]).max()) > 1e-4


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False, sharing="cycle")])
def test_gradient_reaches_every_parameter(overrides):
  cfg = get_config("tiny", **overrides)
  tokens, variables = _init(cfg, batch=4, length=32)

  def loss(params):
    logits, _ = Transformer(cfg).apply({**variables, "params": params}, tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].reshape(-1, cfg.vocab_size)
                     [jnp.arange(4 * 31), tokens[:, 1:].reshape(-1)])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_router_bias_is_not_a_parameter():
  cfg = get_config("tiny", router_bias=True)
  _, variables = _init(cfg)
  assert set(variables) == {"params", "router_bias"}
  chex.assert_shape(variables["router_bias"]["moe_ffn_0"]["moe"]["router"]["bias"], (8,))


def test_parameter_counts_pinned():
  # Worked out by hand in the docstring of test_sharing / README: embed 272*32; per
  # layer attention 3104; dense FFN 6176; MoE layer 27936 of which routed 24576.
  counts = count_params(get_config("tiny"))
  assert counts.total == 8704 + 3 * 3104 + 6176 + 2 * 27936 + 32 == 80096
  assert counts.active == 8704 + 3 * 3104 + 6176 + 2 * (27936 - 24576 + 6144) + 32
  assert counts.routed_experts == 2 * 24576
