"""The GPU suite runs end to end, shrunk, on a CPU, and remat lowers step memory."""
import pytest
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import gpu_suite, remat_memory
from moe_jax.config import get_config
from moe_jax.models.transformer import Transformer


@pytest.mark.slow
def test_gpu_suite_cpu_smoke(tmp_path):
  out = tmp_path / "suite.json"
  gpu_suite.main(["--cpu-smoke", "--out", str(out), "--only", "moe_layer", "train_mfu",
                  "quant", "serving"])
  result = json.loads(out.read_text())
  for name in ("moe_layer", "train_mfu", "quant", "serving"):
    assert "error" not in result[name], result[name]
  shape = result["moe_layer"]["shapes"][0]
  assert {"dropless (tiled)", "dropless (ragged_dot)", "dense limit"} <= set(shape)
  assert 0 < shape["dropless (tiled)"]["vs_dense_limit"]
  assert result["train_mfu"]["dropless-tiled"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_remat_same_gradient_less_memory():
  cfg = get_config("tiny")
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
  params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(1), tokens))

  def grads(c):
    loss = lambda p: jnp.sum(Transformer(c).apply(p, tokens)[0] ** 2)
    return jax.jit(jax.grad(loss))(params)

  ref = grads(cfg)
  for remat in ("full", "dots"):
    # Recomputation may reorder float sums: gradients reach ~10, so 1e-5 absolute.
    chex.assert_trees_all_close(grads(cfg.replace(remat=remat)), ref, rtol=1e-5, atol=1e-5)
  mem = remat_memory.run("tiny", 32, 8)
  assert mem["full"]["temp_mb"] < mem["none"]["temp_mb"]
