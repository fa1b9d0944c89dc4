"""Training end to end: it learns, resumes exactly, stops on NaN, freezes."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data as data_lib
from moe_jax.config import TrainConfig, get_config
from moe_jax.train import TrainingDiverged, init_state, make_optimizer, train

MODEL = get_config("tiny", max_seq_len=32, router_bias=True)
DATA = data_lib.DataConfig(seq_len=32, batch_tokens=256, max_bytes_per_domain=200_000)
TRAIN = TrainConfig(steps=12, warmup_steps=2, lr=3e-3, log_every=2, checkpoint_every=4,
                    eval_batches=1)


def test_short_run_learns_and_reports(tmp_path):
  result = train(MODEL, DATA, TRAIN, tmp_path, progress=False)
  losses = [h["ce"] for h in result.history]
  assert losses[-1] < losses[0] - 0.3            # from ~5.6 (uniform over 272) down
  assert set(result.eval) == {"code", "prose", "math"}
  for r in result.eval.values():
    assert np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1
    chex.assert_trees_all_close(r["perplexity"], np.exp(r["loss"]), rtol=1e-6)
  assert result.eval_load.shape == (MODEL.n_moe_layers, MODEL.n_experts)
  assert {"load_std", "max_vio", "dead_experts", "grad_norm", "lr"} <= set(result.history[-1])
  assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "tb").is_dir()
  # the aux-loss-free bias moved
  bias = result.state.router_bias["moe_ffn_0"]["moe"]["router"]["bias"]
  assert float(jnp.abs(bias).max()) > 0


def test_resume_gives_the_same_losses(tmp_path):
  straight = train(MODEL, DATA, TRAIN, tmp_path / "a", progress=False)
  train(MODEL, DATA, TRAIN, tmp_path / "b", progress=False, stop_at=8)   # "interrupted"
  resumed = train(MODEL, DATA, TRAIN, tmp_path / "b", progress=False)
  assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history]
  np.testing.assert_array_equal([h["loss"] for h in resumed.history],
                                [h["loss"] for h in straight.history])
  chex.assert_trees_all_equal(resumed.state.params, straight.state.params)
  chex.assert_trees_all_equal(resumed.state.router_bias, straight.state.router_bias)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  bad = TRAIN.replace(lr=1e30, grad_clip=1e30, warmup_steps=0)  # explodes
  with pytest.raises(TrainingDiverged, match="last good checkpoint"):
    train(MODEL, DATA, bad, tmp_path, progress=False)


def test_frozen_parameters_do_not_move():
  tcfg = TRAIN.replace(freeze=(r"attn_\d+/",), warmup_steps=0)
  state = init_state(MODEL, tcfg, 16)
  tx = make_optimizer(tcfg, state.params)
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, _ = tx.update(grads, tx.init(state.params), state.params)
  assert float(jnp.abs(updates["attn_0"]["attn"]["wq"]).max()) == 0
  assert float(jnp.abs(updates["moe_ffn_0"]["moe"]["w_up"]).max()) > 0


def test_train_config_errors_name_the_field():
  with pytest.raises(ValueError, match="TrainConfig.balance_loss="):
    TrainConfig(balance_loss="gini")
  with pytest.raises(ValueError, match="TrainConfig.warmup_steps="):
    TrainConfig(steps=10, warmup_steps=20)
