"""LoRA adapters and two-stage fine-tuning (moe_jax/adapt)."""
import functools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moe_jax import data as data_lib
from moe_jax import sharding
from moe_jax.adapt import fraction, lora, stages, storage
from moe_jax.config import TrainConfig, get_config
from moe_jax.models.transformer import Transformer
from moe_jax.train import step as step_lib
from moe_jax.train import train

MODEL = get_config("tiny", max_seq_len=32, router_bias=True)
DATA = data_lib.DataConfig(seq_len=32, batch_tokens=256, max_bytes_per_domain=200_000)
TRAIN = TrainConfig(steps=4, warmup_steps=0, lr=1e-2, log_every=2, checkpoint_every=100,
                    eval_batches=1)
TOKENS = jax.random.randint(jax.random.key(3), (8, 16), 0, 272)


def _params(cfg=MODEL):
  variables = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), TOKENS))
  return variables["params"], variables.get("router_bias", {})


def _logits(params, bias, cfg=MODEL):
  return _apply(cfg, params, bias)


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, bias):
  return Transformer(cfg).apply({"params": params, "router_bias": bias}, TOKENS)[0]


def _random_b(adapters, key):
  """Adapters with B != 0 (after init B is zero and the delta vanishes)."""
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in
                                   zip(keys, leaves)])


def test_b_zero_leaves_logits_unchanged():
  params, bias = _params()
  adapters = lora.init_adapters(params, lora.LoraConfig(rank=4), jax.random.key(1))
  flat = traverse_util.flatten_dict(adapters, sep="/")
  # every kind of module is adapted, routed experts with one adapter per expert
  assert {"attn_0/attn/wq/a", "attn_0/attn/wo/b", "dense_ffn_0/mlp/w_up/a",
          "moe_ffn_0/moe/shared_experts/w_down/a", "moe_ffn_1/moe/w_gate/a"} <= set(flat)
  assert flat["moe_ffn_1/moe/w_gate/a"].shape == (8, 32, 4)       # (E, D, r)
  assert flat["moe_ffn_1/moe/w_down/b"].shape == (8, 4, 32)       # (E, r, D)
  assert flat["attn_0/attn/wo/a"].shape == (32, 4)                 # (Nq*H, r)
  assert float(jnp.abs(flat["attn_0/attn/wq/a"]).max()) > 0
  adapted = lora.adapted(params, adapters, lora.LoraConfig(rank=4))
  chex.assert_trees_all_equal(_logits(adapted, bias), _logits(params, bias))


def test_delta_is_per_expert_and_merge_matches_unmerged_matmul():
  params, bias = _params()
  cfg = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = _random_b(lora.init_adapters(params, cfg, jax.random.key(1)), jax.random.key(2))
  merged = lora.merge(params, adapters, cfg)
  # routed experts: expert e's weight moves by (alpha/r) A[e] @ B[e], no mixing
  ad = adapters["moe_ffn_0"]["moe"]["w_up"]
  for e in range(MODEL.n_experts):
    np.testing.assert_allclose(
        merged["moe_ffn_0"]["moe"]["w_up"][e] - params["moe_ffn_0"]["moe"]["w_up"][e],
        2.0 * ad["a"][e] @ ad["b"][e], rtol=1e-5, atol=1e-6)
  # an attention projection: x @ merged == x @ W + scale * (x @ A) @ B (unmerged path)
  x = jax.random.normal(jax.random.key(4), (5, MODEL.d_model))
  ad = adapters["attn_1"]["attn"]["wq"]
  w = params["attn_1"]["attn"]["wq"].reshape(MODEL.d_model, -1)
  np.testing.assert_allclose(
      x @ merged["attn_1"]["attn"]["wq"].reshape(MODEL.d_model, -1),
      x @ w + 2.0 * (x @ ad["a"]) @ ad["b"], rtol=1e-4, atol=1e-5)
  # merged model == adapted-on-the-fly model; the delta changes the logits
  np.testing.assert_allclose(_logits(merged, bias),
                             _logits(lora.adapted(params, adapters, cfg), bias), atol=1e-5)
  assert float(jnp.abs(_logits(merged, bias) - _logits(params, bias)).max()) > 1e-3
  # unmerge gives the base back (float rounding only)
  chex.assert_trees_all_close(lora.unmerge(merged, adapters, cfg), params, atol=1e-7)


@pytest.mark.parametrize("dispatch", ["dense", "capacity", "ragged"])
def test_adapted_model_runs_every_dispatch_and_expert_parallel(dispatch):
  impl = dict(dispatch="dropless", dropless_impl="ragged") if dispatch == "ragged" else \
      dict(dispatch=dispatch, capacity_factor=8.0)
  cfg = MODEL.replace(ep_capacity_factor=8.0, **impl)
  params, bias = _params()
  lcfg = lora.LoraConfig(rank=2)
  adapters = _random_b(lora.init_adapters(params, lcfg, jax.random.key(1)), jax.random.key(2))
  ref = _logits(lora.merge(params, adapters, lcfg), bias)        # default: tiled dropless
  out = _logits(lora.adapted(params, adapters, lcfg), bias, cfg)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  with jax.set_mesh(sharding.make_mesh(expert=8)):
    ep = jax.jit(lambda p, a: _logits(lora.adapted(p, a, lcfg), bias, cfg))(params, adapters)
  np.testing.assert_allclose(ep, ref, atol=2e-5)


@pytest.mark.slow
def test_training_changes_only_adapters(tmp_path):
  params, bias = _params()
  base = jax.tree.map(np.array, params)                  # host copy to compare against
  lcfg = lora.LoraConfig(rank=2, dropout=0.1)
  obj = stages.lora_objective(MODEL, TRAIN, lcfg, params, router_bias=bias)
  result = train(MODEL, DATA, TRAIN, tmp_path, objective=obj, frozen={"base": params},
                 progress=False)
  trained = result.state.params
  assert jax.tree.structure(trained) == jax.tree.structure(
      lora.init_adapters(params, lcfg, jax.random.key(0)))   # the state holds adapters only
  b = trained["moe_ffn_0"]["moe"]["w_up"]["b"]
  assert float(jnp.abs(b).max()) > 0                     # B left zero: it trained
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), base)   # base untouched
  assert np.isfinite(result.eval["math"]["loss"])


def test_adapters_save_and_load_alone(tmp_path):
  params, _ = _params()
  cfg = lora.LoraConfig(rank=4, alpha=4.0, targets=(lora.TARGETS["attention"],))
  adapters = _random_b(lora.init_adapters(params, cfg, jax.random.key(1)), jax.random.key(2))
  size = storage.save_adapters(tmp_path / "ad", adapters, cfg, base={"d_model": 32})
  loaded, loaded_cfg = storage.load_adapters(tmp_path / "ad", base={"d_model": 32})
  assert loaded_cfg == cfg
  chex.assert_trees_all_equal(loaded, jax.tree.map(np.asarray, adapters))
  assert set(loaded) == {"attn_0", "attn_1", "attn_2"}          # no base weights inside
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert size < base_bytes / 2
  with pytest.raises(ValueError, match="another model config.*d_model"):
    storage.load_adapters(tmp_path / "ad", base={"d_model": 64})
  with pytest.raises(FileNotFoundError, match="lora.json"):
    storage.load_adapters(tmp_path)


def test_parameter_fraction_matches_hand_count():
  r = 2
  n = fraction.lora_count(get_config("tiny"), lora.LoraConfig(rank=r))
  # tiny: D=32, 4 query heads / 2 kv heads of 8, dense F=64, 8 experts of 32, 1 shared,
  # top-2, 3 layers (1 dense + 2 MoE), no sharing.
  attn = r * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))         # wq, wk, wv, wo
  dense = r * ((32 + 64) * 2 + (64 + 32))
  shared = 3 * r * (32 + 32)
  routed_one = 3 * r * (32 + 32)                                     # one expert
  assert n.adapter_total == 3 * attn + dense + 2 * (shared + 8 * routed_one)
  assert n.adapter_active == 3 * attn + dense + 2 * (shared + 2 * routed_one)
  assert n.fraction_total == n.adapter_total / 80096                 # counting.py's total
  assert fraction.matrix_fraction(16, 4096, 4096) == 32 / 4096
  assert round(fraction.square_width_for(16, 0.007)) == 4571
  # shared sets: one stored adapter, applied by every layer that uses the set
  shared_cfg = get_config("tiny", sharing="all", n_dense_layers=0)
  m = fraction.lora_count(shared_cfg, lora.LoraConfig(rank=r, targets=(lora.TARGETS[
      "attention"],)))
  assert (m.adapter_total, m.adapter_active) == (attn, 3 * attn)


def test_staircase_schedule_at_epoch_boundaries():
  sched = stages.staircase_lr(1e-5, 0.95, steps_per_epoch=10)
  values = [float(sched(s)) for s in (0, 9, 10, 19, 20, 35)]
  np.testing.assert_allclose(values, [1e-5, 1e-5, 9.5e-6, 9.5e-6, 9.025e-6, 8.57375e-6],
                             rtol=1e-6)
  later = stages.staircase_lr(1e-5, 0.95, steps_per_epoch=10, offset=10)   # stage 2
  np.testing.assert_allclose(float(later(0)), 9.5e-6, rtol=1e-6)
  np.testing.assert_allclose(float(later(10)), 9.025e-6, rtol=1e-6)


def test_lower_layer_freeze_follows_the_sharing_plan():
  assert stages.lower_layer_freeze(MODEL, 2) == (
      "^embed$", "^attn_0/", "^attn_1/", "^dense_ffn_0/", "^moe_ffn_0/")
  assert stages.lower_layer_freeze(MODEL, 0) == ()
  shared = get_config("tiny", sharing="all", n_dense_layers=0)
  assert stages.lower_layer_freeze(shared, 1, freeze_embedding=False) == (
      "^attn_0/", "^moe_ffn_0/")
  with pytest.raises(ValueError, match="frozen_layers=4"):
    stages.lower_layer_freeze(MODEL, 4)
  with pytest.raises(ValueError, match="FinetuneConfig.stage1_epochs"):
    stages.FinetuneConfig(epochs=2, stage1_epochs=2)


@pytest.mark.slow
def test_two_stage_freezes_lower_layers_bitwise_then_trains_all(tmp_path):
  params, bias = _params()
  base = jax.tree.map(np.array, params)
  fcfg = stages.FinetuneConfig(lr=1e-2, epochs=2, stage1_epochs=1, frozen_layers=2)
  out = stages.two_stage(MODEL, DATA, TRAIN, fcfg, str(tmp_path), base_params=params,
                         router_bias=bias, steps_per_epoch=3, progress=False)
  s1 = out.stage1.state.params
  for name in ("embed", "attn_0", "attn_1", "dense_ffn_0", "moe_ffn_0"):
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, s1[name]), base[name])
  for name, w in (("attn_2", "attn/wq"), ("moe_ffn_1", "moe/w_up"), ("final_norm", "scale")):
    flat = traverse_util.flatten_dict(s1[name], sep="/")
    assert not np.array_equal(np.asarray(flat[w]),
                              traverse_util.flatten_dict(base[name], sep="/")[w])
  assert out.stage1.steps_trained == 3 and out.stage2.steps_trained == 3
  # stage 2 trains everything, its staircase continuing at epoch 1
  assert not np.array_equal(np.asarray(out.params["attn_0"]["attn"]["wq"]),
                            base["attn_0"]["attn"]["wq"])
  np.testing.assert_allclose(out.stage2.history[0]["lr"], 1e-2 * 0.95, rtol=1e-6)
  np.testing.assert_allclose(out.stage1.history[0]["lr"], 1e-2, rtol=1e-6)


@pytest.mark.slow
def test_finetune_experiment_end_to_end(tmp_path):
  from experiments import run
  tiny = ["model.d_model=32", "model.d_expert=32", "model.n_layers=2", "model.n_heads=2",
          "model.n_kv_heads=2", "model.max_seq_len=32", "model.d_ff=64", "data.seq_len=32",
          "data.batch_tokens=2048", "train.steps=4", "train.warmup_steps=1",
          "train.eval_batches=1"]
  assert run.main(["--exp=finetune", "--quick", "--no-progress",
                   f"--workdir={tmp_path}"] + tiny) == 0
  record = json.loads((tmp_path / "results.json").read_text())
  table = {r["variant"]: r for r in record["table"]}
  # --quick: one row per code path (full, LoRA, two stages at the source lr)
  assert list(table) == ["frozen base", "full, tuned lr", "LoRA r=16, tuned lr",
                         "two-stage, lr 1e-5 (source)"]
  assert table["frozen base"]["trainable_%"] == "0"
  assert 0 < float(table["LoRA r=16, tuned lr"]["trainable_%"]) < 100
  assert table["LoRA r=16, tuned lr"]["disk_KB"] < table["full, tuned lr"]["disk_KB"]
  assert table["full, tuned lr"]["math_gain"] != "+0.000"
  runs = {r["variant"]: r for r in record["runs"] if "variant" in r}
  assert runs["full, tuned lr"]["math_loss"] < runs["frozen base"]["math_loss"]
  assert (tmp_path / "seed0" / "LoRA_r_16__tuned_lr" / "adapters" / "lora.json").exists()


def test_seeds_share_compiled_steps():
  """Fine-tuning runs that differ only in seed get equal objectives (functions and
  schedule), so step.compile_steps hands them one compiled step; another rank or
  lr does not."""
  params, bias = _params()
  sched = lambda lr, offset=0: stages.staircase(lr, 0.95, 10, offset)
  assert sched(1e-3, 5) is sched(1e-3, 5) and sched(1e-3) is not sched(1e-5)

  def steps(kind, seed, rank=2, lr=1e-3):
    tcfg = TRAIN.replace(seed=seed, lr=lr)
    if kind == "lora":
      obj = stages.lora_objective(MODEL, tcfg, lora.LoraConfig(rank=rank), params,
                                  router_bias=bias, schedule=sched(lr))
    else:
      obj = stages.full_objective(MODEL, tcfg, params, router_bias=bias, schedule=sched(lr))
    return step_lib.compile_steps(obj, tcfg)

  assert steps("lora", 0) is steps("lora", 1)
  assert steps("full", 0) is steps("full", 2)
  assert steps("lora", 0) is not steps("lora", 0, rank=4)
  assert steps("full", 0) is not steps("full", 0, lr=1e-5)
  # the language model's eval reads no TrainConfig: a base and its fine-tunes share it
  assert steps("full", 0)[1] is steps("full", 0, lr=1e-5)[1]
