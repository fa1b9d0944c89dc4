"""Sharded == single device, on 8 simulated CPU devices (tests/conftest.py)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import sharding
from moe_jax.config import TrainConfig, get_config
from moe_jax.models import MoEBlock
from moe_jax.train.step import init_state, jit_steps, state_shardings

MESHES = [dict(expert=8), dict(data=2, expert=4), dict(data=2, expert=2, tensor=2),
          dict(data=4, tensor=2)]
# Every strategy on the richest mesh, the default (dropless) on every mesh.
# The default suite runs the first mesh and the richest one; the rest are slow.
_slow = lambda *case: pytest.param(*case, marks=pytest.mark.slow)
CASES = [("dropless", MESHES[0]), _slow("dropless", MESHES[1]), ("dropless", MESHES[2]),
         _slow("dropless", MESHES[3]), _slow("dense", MESHES[2]), ("capacity", MESHES[2])]


def _loss(cfg, params, x):
  y, stats = MoEBlock(cfg).apply(params, x)
  return jnp.sum(jnp.sin(y)), stats


@pytest.mark.parametrize("dispatch, mesh_shape", CASES, ids=lambda c: c if isinstance(c, str)
                         else "x".join(f"{k}{v}" for k, v in c.items()))
def test_moe_block_sharded_equals_single_device(dispatch, mesh_shape):
  # Factors large enough that nothing is dropped anywhere: the same function.
  cfg = get_config("tiny", dispatch=dispatch, capacity_factor=8.0, ep_capacity_factor=8.0,
                   router_bias=True)
  x = jax.random.normal(jax.random.key(0), (8, 12, cfg.d_model))
  params = nn.meta.unbox(MoEBlock(cfg).init(jax.random.key(1), x))
  params["router_bias"] = jax.tree.map(
      lambda b: jax.random.normal(jax.random.key(2), b.shape) * 0.05, params["router_bias"])
  grad_fn = jax.value_and_grad(lambda p, x: _loss(cfg, p, x), argnums=(0, 1), has_aux=True)
  (ref, ref_stats), ref_grads = jax.jit(grad_fn)(params, x)
  mesh = sharding.make_mesh(**mesh_shape)
  with jax.set_mesh(mesh):
    (out, stats), grads = jax.jit(grad_fn)(params, x)
  chex.assert_trees_all_close(out, ref, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(stats, ref_stats, rtol=1e-5, atol=1e-6)


def test_expert_parallel_reports_drops_with_small_exchange_capacity():
  cfg = get_config("tiny", ep_capacity_factor=0.25)
  x = jax.random.normal(jax.random.key(0), (8, 12, cfg.d_model))
  params = nn.meta.unbox(MoEBlock(cfg).init(jax.random.key(1), x))
  with jax.set_mesh(sharding.make_mesh(expert=8)):
    _, stats = jax.jit(MoEBlock(cfg).apply)(params, x)
  assert 0.0 < float(stats["dropped"]) < 1.0


def test_experts_must_divide_expert_axis():
  cfg = get_config("tiny", n_experts=4, n_groups=2, topk_groups=1)
  x = jnp.zeros((8, 4, cfg.d_model))
  params = nn.meta.unbox(MoEBlock(cfg).init(jax.random.key(1), x))
  with jax.set_mesh(sharding.make_mesh(expert=8)):
    with pytest.raises(ValueError, match="n_experts=4 must be divisible"):
      MoEBlock(cfg).apply(params, x)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)],
                         ids=["data2xexpert4", "fsdp2xexpert2xtensor2"])
@pytest.mark.slow
def test_train_step_on_mesh_matches_one_device(mesh_shape):
  mcfg = get_config("tiny", ep_capacity_factor=8.0, router_bias=True)
  tcfg = TrainConfig(steps=3, warmup_steps=1)
  tokens = jax.random.randint(jax.random.key(3), (8, 17), 0, 256)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def run(mesh):
    shardings = state_shardings(mcfg, tcfg, 16, mesh)
    state = jax.device_put(init_state(mcfg, tcfg, 16), shardings)
    step, _ = jit_steps(mcfg, tcfg, mesh, shardings)
    losses = []
    for _ in range(3):
      state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
      losses.append(float(metrics["loss"]))
    return losses, state

  ref_losses, ref_state = run(sharding.single_device_mesh())
  losses, state = run(sharding.make_mesh(**mesh_shape))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params),
                              rtol=1e-4, atol=1e-5)
  # parameters really are laid out over the mesh
  w = state.params["moe_ffn_0"]["moe"]["w_up"]
  assert len(w.sharding.device_set) == 8
