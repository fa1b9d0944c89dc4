"""Checkpointer: exact round trip, schedule, retention, atomicity, clear errors."""

import glob
import os

import chex
import flax
import jax
import jax.numpy as jnp
import optax
import pytest
from orbax.checkpoint._src.path import async_path

from moe_jax.train.checkpoint import CheckpointError, Checkpointer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  router_bias: jax.Array
  rng: jax.Array  # jax.random.key_data(key): uint32, typed keys are not serializable


def make_state(seed: int = 0) -> TrainState:
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
      "embed": jax.random.normal(k1, (16, 8), jnp.bfloat16),
      "w_out": jax.random.normal(k2, (8, 16), jnp.float32),
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  # One real update so mu/nu/count hold non-trivial values.
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return TrainState(
      step=jnp.asarray(seed + 1, jnp.int32), params=params, opt_state=opt_state,
      router_bias=jnp.linspace(-1, 1, 4, dtype=jnp.float32),
      rng=jax.random.key_data(jax.random.key(seed + 42)))


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


DATA_STATE = {"next_row": 128, "domain_pos": [3, 5, 0]}
META = {"config": {"d_model": 8, "lr": 1e-3}, "fingerprint": "ab12", "losses": [3.5, 3.25]}


def save(ckpt, step, seed=0, **kw):
  return ckpt.maybe_save(step, make_state(seed), data_state=DATA_STATE, meta=META, **kw)


def test_exact_round_trip(tmp_path):
  state = make_state(3)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.maybe_save(4, state, data_state=DATA_STATE, meta=META)
  # A fresh Checkpointer, as on resume in a new process.
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.latest_step() == 4
    restored, data_state, meta = ckpt.restore(abstract(state))
  assert isinstance(restored, TrainState)
  chex.assert_trees_all_equal(restored, state)  # bitwise, not allclose
  chex.assert_trees_all_equal_dtypes(restored, state)
  assert restored.rng.dtype == jnp.uint32 and restored.params["embed"].dtype == jnp.bfloat16
  assert data_state == DATA_STATE
  assert meta == META


def test_restore_from_concrete_example_and_default_meta(tmp_path):
  state = make_state(1)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.maybe_save(1, state, data_state=DATA_STATE)  # meta omitted
    restored, _, meta = ckpt.restore(make_state(0))
  chex.assert_trees_all_equal(restored, state)
  assert meta == {}


def test_save_every_keep_and_force(tmp_path):
  with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
    saved = [step for step in range(1, 13) if save(ckpt, step)]
    assert saved == [3, 6, 9, 12]
    assert ckpt.all_steps() == [9, 12]
    assert not save(ckpt, 13)
    assert save(ckpt, 13, force=True)  # off schedule, e.g. stopping on NaN
    assert not save(ckpt, 13, force=True)  # already on disk: no-op, no error
    assert ckpt.all_steps() == [12, 13]
  assert sorted(os.listdir(tmp_path)) == ["12", "13"]


def test_restore_a_given_step(tmp_path):
  with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
    for step in (1, 2):
      save(ckpt, step, seed=step)
    restored, _, _ = ckpt.restore(abstract(make_state()), step=1)
  chex.assert_trees_all_equal(restored, make_state(1))


def test_interrupted_save_never_becomes_latest(tmp_path, monkeypatch):
  ckpt = Checkpointer(tmp_path, save_every=1)
  save(ckpt, 1)
  # Crash at the last moment of saving step 2: every item is written, only the
  # atomic rename of the step directory is missing.
  rename = async_path.rename

  async def crash_before_commit(src, dst):
    if os.path.basename(dst) == "2":
      raise RuntimeError("simulated crash")
    return await rename(src, dst)

  monkeypatch.setattr(async_path, "rename", crash_before_commit)
  with pytest.raises(RuntimeError, match="simulated crash"):
    save(ckpt, 2)
  monkeypatch.undo()
  ckpt.close()
  assert os.path.isdir(tmp_path / "2.orbax-checkpoint-tmp")

  ckpt = Checkpointer(tmp_path, save_every=1)  # the resumed run
  assert ckpt.latest_step() == 1
  chex.assert_trees_all_equal(ckpt.restore(abstract(make_state()))[0], make_state())
  save(ckpt, 3)  # orbax finishes its startup cleanup of tmp dirs before a save
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "3"]


def test_empty_directory_raises_file_not_found(tmp_path):
  with Checkpointer(tmp_path / "run", save_every=1) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "run")):
      ckpt.restore(abstract(make_state()))
    save(ckpt, 1)
    with pytest.raises(FileNotFoundError, match=r"step 7 .*available steps: \[1\]"):
      ckpt.restore(abstract(make_state()), step=7)


def _corrupt_array_files(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files, "orbax layout changed: no array data files found"
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete_array_files(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    os.remove(path)


def _garbage_in(relative):
  def corrupt(step_dir):
    with open(os.path.join(step_dir, relative), "w") as f:
      f.write("{not json")
  return corrupt


# A one-array state: with several arrays, the reads orbax runs in parallel
# outlive the first failure and later report "Event loop is closed" from
# tensorstore threads into whichever test runs then.
ONE_ARRAY = {"w": jnp.arange(64, dtype=jnp.float32)}


@pytest.mark.parametrize("corrupt", [
    _corrupt_array_files, _delete_array_files,
    _garbage_in("state/_METADATA"), _garbage_in("meta/metadata"),
], ids=["truncated_arrays", "deleted_arrays", "state_metadata", "meta_json"])
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, corrupt):
  with Checkpointer(tmp_path, save_every=5) as ckpt:
    ckpt.maybe_save(5, ONE_ARRAY, data_state=DATA_STATE)
  corrupt(str(tmp_path / "5"))
  with Checkpointer(tmp_path, save_every=5) as ckpt:
    with pytest.raises(CheckpointError, match=f"checkpoint step 5 in {tmp_path}: item") as info:
      ckpt.restore(abstract(ONE_ARRAY))
  assert isinstance(info.value, RuntimeError)
  assert info.value.__cause__ is not None
  assert "tensorstore_spec" not in str(info.value) and "\n" not in str(info.value)


def test_structure_mismatch_raises_checkpoint_error(tmp_path):
  with Checkpointer(tmp_path, save_every=5) as ckpt:
    ckpt.maybe_save(5, ONE_ARRAY, data_state=DATA_STATE)
    with pytest.raises(CheckpointError, match="shape"):
      ckpt.restore({"w": jax.ShapeDtypeStruct((8,), jnp.float32)})  # saved: (64,)


def _flip_one_bit(step_dir):
  """One bit in the middle of the array data: orbax reads it back without an error
  (as wrong numbers, or a decompression failure); the checksum must catch it."""
  path = max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
             key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


def test_flipped_bit_is_caught_by_the_checksum_and_named(tmp_path):
  with Checkpointer(tmp_path, save_every=5) as ckpt:
    ckpt.maybe_save(5, ONE_ARRAY, data_state=DATA_STATE, meta=META)
  _flip_one_bit(str(tmp_path / "5"))
  with Checkpointer(tmp_path, save_every=5) as ckpt:
    with pytest.raises(CheckpointError) as info:
      ckpt.restore(abstract(ONE_ARRAY))
    message = str(info.value)
    assert message.startswith(f"checkpoint step 5 in {tmp_path}: item 'state'")
    assert "array ['w']: sha256 mismatch" in message or "unreadable" in message, message
    # Moved aside, not deleted; the directory no longer lists the step.
    moved = ckpt.quarantine(5)
    assert ckpt.all_steps() == [] and os.path.isdir(moved)
    assert os.path.dirname(moved) == f"{tmp_path}.corrupt"


def test_edited_json_items_fail_their_checksums(tmp_path):
  with Checkpointer(tmp_path, save_every=5) as ckpt:
    ckpt.maybe_save(5, ONE_ARRAY, data_state=DATA_STATE, meta=META)
  path = tmp_path / "5" / "meta" / "metadata"
  path.write_text(path.read_text().replace("ab12", "ab13"))
  with Checkpointer(tmp_path, save_every=5) as ckpt:
    with pytest.raises(CheckpointError, match=r"item 'meta': sha256 mismatch"):
      ckpt.read_json(5)
  (tmp_path / "5" / "checksums" / "metadata").unlink()
  with Checkpointer(tmp_path, save_every=5) as ckpt:
    with pytest.raises(CheckpointError, match=r"item 'checksums': unreadable"):
      ckpt.read_json(5)
