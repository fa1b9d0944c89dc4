"""Training end to end through the one loop: it learns, resumes bit for bit after a
SIGKILL anywhere (mid-save included), never checkpoints a non-finite step, detects and
falls back from corrupt checkpoints, refuses another config, keeps its logs exact.

One finished run (module fixture) is the reference; every other run in this file
shares its configs, so the compiled step is reused (train.step.compile_steps)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data as data_lib
from moe_jax.config import TrainConfig, get_config
from moe_jax.train import (Checkpointer, ConfigMismatch, TrainingDiverged,
                           init_state, make_optimizer, train)
from moe_jax.train.monitoring import loss_fluctuation
from moe_jax.train.step import jit_steps

MODEL = get_config("tiny", max_seq_len=32, router_bias=True)
DATA = data_lib.DataConfig(seq_len=32, batch_tokens=256, max_bytes_per_domain=200_000)
TRAIN = TrainConfig(steps=8, warmup_steps=2, lr=1e-2, log_every=1, checkpoint_every=2,
                    keep_checkpoints=3, eval_batches=1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A finished 8-step run: checkpoints at steps 4, 6, 8 (keep 3)."""
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, train(MODEL, DATA, TRAIN, workdir, progress=False, log=lambda s: None)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return ([r["step"] for r in rows if "train/loss" in r],
          [r["step"] for r in rows if "eval/code/loss" in r])


def test_short_run_learns_and_reports(reference):
  workdir, result = reference
  losses = [h["ce"] for h in result.history]
  assert losses[-1] < losses[0] - 0.3            # from ~5.6 (uniform over 272) down
  assert set(result.eval) == {"code", "prose", "math"}
  for r in result.eval.values():
    assert np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1
    chex.assert_trees_all_close(r["perplexity"], np.exp(r["loss"]), rtol=1e-6)
  assert result.eval_load.shape == (MODEL.n_moe_layers, MODEL.n_experts)
  assert {"load_std", "max_vio", "dead_experts", "grad_norm", "lr"} <= set(result.history[-1])
  assert (workdir / "tb").is_dir()
  assert _rows(workdir) == (list(range(1, 9)), [8])
  # the aux-loss-free bias moved
  bias = result.state.router_bias["moe_ffn_0"]["moe"]["router"]["bias"]
  assert float(jnp.abs(bias).max()) > 0
  # Loss fluctuation is over per-step losses (the last 50), not over row means.
  np.testing.assert_allclose(result.history[-1]["loss_fluctuation"],
                             loss_fluctuation([h["loss"] for h in result.history]))
  assert result.configs["model"]["d_model"] == MODEL.d_model and result.model == MODEL
  assert result.steps_trained == 8 and result.tokens_per_s > 0


def test_finished_run_rerun_trains_nothing_and_reports_no_speed(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  said = []
  again = train(MODEL, DATA, TRAIN, workdir, progress=False, log=said.append)
  assert said == [f"resuming from step 8 ({workdir})"]
  assert again.steps_trained == 0 and np.isnan(again.tokens_per_s)
  chex.assert_trees_all_equal(again.state.params, reference[1].state.params)
  assert _rows(workdir) == (list(range(1, 9)), [8])           # no duplicate eval row


@pytest.mark.slow
def test_kill_anywhere_and_resume_is_exact(reference, tmp_path):
  """SIGKILL after a row but before its checkpoint, mid-save (every item written, the
  step not committed) and just after a checkpoint; each rerun resumes, the last one
  here. Losses, parameters and the JSONL rows equal the uninterrupted run's."""
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  expected_resume = [None, 2, 2]
  for when, resumed in zip(["after_row:3", "mid_save:4", "after_save:6"], expected_resume):
    child = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_child.py"),
                            str(workdir), when], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == -9, (when, child.stdout, child.stderr[-2000:])
    assert (f"resuming from step {resumed}" in child.stdout) == (resumed is not None), when
  # The mid-save kill left no step 4 behind (its tmp directory was cleaned up).
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  said = []
  resumed = train(MODEL, DATA, TRAIN, workdir, progress=False, log=said.append)
  assert said == [f"resuming from step 6 ({workdir})"]
  straight = reference[1]
  assert [h["step"] for h in resumed.history] == list(range(1, 9))
  np.testing.assert_array_equal([h["loss"] for h in resumed.history],
                                [h["loss"] for h in straight.history])
  chex.assert_trees_all_equal(resumed.state.params, straight.state.params)
  chex.assert_trees_all_equal(resumed.state.opt_state, straight.state.opt_state)
  chex.assert_trees_all_equal(resumed.state.router_bias, straight.state.router_bias)
  chex.assert_trees_all_equal(resumed.state.rng, straight.state.rng)
  # Every step's row once (rows after a restored step were dropped, then rewritten).
  assert _rows(workdir) == (list(range(1, 9)), [8])
  with open(workdir / "metrics.jsonl") as f:
    rows = {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}
  np.testing.assert_array_equal([rows[s]["train/loss"] for s in range(1, 9)],
                                [h["loss"] for h in straight.history])


def _largest_state_file(step_dir):
  files = glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*"))
  return max(files, key=os.path.getsize)


def _flip_bit(step_dir):
  path = _largest_state_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


def _garble_64(step_dir):
  path = _largest_state_file(step_dir)
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 3
  data[mid:mid + 64] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()
  open(path, "wb").write(bytes(data))


def _truncate(step_dir):
  path = _largest_state_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _delete_item(step_dir):
  shutil.rmtree(step_dir / "data_state")


def _data_state_without_domain_pos(step_dir):
  """A data_state saved without `domain_pos` (checksum consistent: not a flipped byte
  but an incomplete state), caught by the key check rather than a later KeyError."""
  from moe_jax.train.checkpoint import _json_digest
  (path,) = glob.glob(str(step_dir / "data_state" / "metadata"))
  state = json.load(open(path))
  del state["domain_pos"]
  json.dump(state, open(path, "w"))
  (sums_path,) = glob.glob(str(step_dir / "checksums" / "metadata"))
  sums = json.load(open(sums_path))
  sums["data_state"] = _json_digest(state)
  json.dump(sums, open(sums_path, "w"))


@pytest.mark.parametrize("corrupt, item, what", [
    (_flip_bit, "state", "sha256 mismatch|unreadable"),
    (_garble_64, "state", "sha256 mismatch|unreadable"),
    (_truncate, "state", "unreadable"),
    (_delete_item, "data_state", "missing"),
    (_data_state_without_domain_pos, "data_state", r"has keys \['next_row'\]"),
])
def test_corrupt_checkpoint_is_named_and_the_run_falls_back(reference, tmp_path, corrupt,
                                                            item, what):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  corrupt(workdir / "checkpoints" / "8")
  said = []
  resumed = train(MODEL, DATA, TRAIN, workdir, progress=False, log=said.append)
  error = said[0]                                 # the CheckpointError, one line
  assert error.startswith(f"checkpoint step 8 in {workdir}/checkpoints: item '{item}'")
  assert re.search(what, error) and len(error) < 600, error
  assert error.endswith("; trying the previous checkpoint")
  assert f"fell back to step 6, the newest intact checkpoint" in said
  assert said[-1] == f"resuming from step 6 ({workdir})"
  assert len(os.listdir(f"{workdir}/checkpoints.corrupt")) == 1     # moved, not deleted
  chex.assert_trees_all_equal(resumed.state.params, reference[1].state.params)


@pytest.mark.slow
def test_divergent_run_checkpoints_only_finite_states(tmp_path):
  """lr=1e6: the loss stays finite for a while, but the gradient norm turns NaN. No
  checkpoint may hold a NaN, and the one the error names restores."""
  bad = TRAIN.replace(lr=1e6, warmup_steps=0, checkpoint_every=1, keep_checkpoints=100)
  with pytest.raises(TrainingDiverged) as e:
    train(MODEL, DATA, bad, tmp_path, progress=False, log=lambda s: None)
  with Checkpointer(tmp_path / "checkpoints", save_every=1) as ckpt:
    steps = ckpt.all_steps()
    assert steps, "the run should have checkpointed the steps before the bad one"
    assert f"The last checkpoint, step {steps[-1]} in" in str(e.value)
    assert f"step {steps[-1] + 1} was not finite" in str(e.value)
    for step in steps:
      state, _, _ = ckpt.restore(init_state(MODEL, bad, DATA.seq_len), step)
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)), step
  # The rows of the finite steps and an evaluation were written despite the error.
  train_rows, eval_rows = _rows(tmp_path)
  assert train_rows == steps and len(eval_rows) == 1
  # Skip mode: refused steps are counted, and N in a row stop the run.
  skip = bad.replace(on_nonfinite="skip", max_skipped_steps=2)
  with pytest.raises(TrainingDiverged, match="2 consecutive non-finite steps"):
    train(MODEL, DATA, skip, tmp_path / "skip", progress=False, log=lambda s: None)
  with Checkpointer(tmp_path / "skip" / "checkpoints", save_every=1) as ckpt:
    state, _, meta = ckpt.restore(init_state(MODEL, bad, DATA.seq_len))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_a_non_finite_step_leaves_the_state_unchanged():
  """lr=1e308: the update overflows to inf at once (loss and gradients are finite).
  The step is refused inside jit: params, optimizer state and router bias keep their
  values; the step counter and the key move on."""
  mcfg = get_config("tiny", n_layers=1, n_dense_layers=0, router_bias=True)
  tcfg = TrainConfig(steps=4, warmup_steps=0, lr=1e308)
  state = init_state(mcfg, tcfg, 8)
  before = jax.device_get(state)
  step, _ = jit_steps(mcfg, tcfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 256)
  state, metrics = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  assert not bool(metrics["finite"])
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  chex.assert_trees_all_equal(jax.device_get(state.params), before.params)
  chex.assert_trees_all_equal(jax.device_get(state.opt_state), before.opt_state)
  chex.assert_trees_all_equal(jax.device_get(state.extra), before.extra)
  assert int(state.step) == 1 and not np.array_equal(state.rng, before.rng)


@pytest.mark.slow
def test_changed_config_is_refused_and_fresh_keeps_the_old_run(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  for mcfg, tcfg, diff in [
      (MODEL, TRAIN.replace(lr=0.02), "train.lr: 0.01 -> 0.02"),
      (MODEL, TRAIN.replace(steps=4, warmup_steps=1),
       "train.steps: 8 -> 4; train.warmup_steps: 2 -> 1"),
      (MODEL.replace(d_model=64), TRAIN, "model.d_model: 32 -> 64")]:
    with pytest.raises(ConfigMismatch, match="Differences \\(old -> new\\): " + diff + r"\."):
      train(mcfg, DATA, tcfg, workdir, progress=False)
  # Bookkeeping may change: resuming with another log interval is fine.
  train(MODEL, DATA, TRAIN.replace(log_every=4, eval_batches=2), workdir, progress=False,
        log=lambda s: None)
  said = []
  result = train(MODEL, DATA, TRAIN, workdir, progress=False, fresh=True, stop_at=2,
                 log=said.append)
  (old,) = glob.glob(f"{workdir}.old-*")
  assert said == [f"--fresh: moved the old run to {old}"]
  assert sorted(os.listdir(f"{old}/checkpoints")) == ["4", "6", "8"]   # kept intact
  assert result.steps_trained == 2 and _rows(workdir) == ([1, 2], [2])


@pytest.mark.slow
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
  with pytest.raises(ValueError, match="TrainConfig.on_nonfinite="):
    TrainConfig(on_nonfinite="ignore")
