"""Training checkpoints: orbax's `CheckpointManager` plus a checksum of everything.

One checkpoint step holds four items, written with orbax composite args:
  state       the train-state pytree (params, optax state, extra, rng key data,
              step) via `StandardSave` / `StandardRestore`;
  data_state  the input iterator's JSON state (`it.get_state()`) via `JsonSave`,
              so a resumed run sees exactly the batches it would have seen;
  meta        JSON run metadata (resolved configs, corpus fingerprint, history);
  checksums   sha256 of every state array's bytes (with dtype and shape), and of
              the canonical JSON of data_state and meta.

    save:     state ──sha256 per leaf──┐
              data_state, meta ─sha256─┴─> checksums     (4 items, one atomic step)
    restore:  every item present? -> JSON items parse and match? -> arrays read and
              match?  else CheckpointError("checkpoint step 8 in DIR: item 'state',
              array ['params']['embed']: sha256 mismatch ...")  (one line)

Orbax's own reads catch a truncated file but not a flipped bit or garbled bytes
(zarr chunks carry no checksum), which restore as wrong numbers; the checksums
catch those. A corrupt step can be moved aside (`quarantine`), never deleted, and
the loop falls back to the newest intact step.

Atomicity is orbax's: on a local filesystem each step is written into
`<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every item is
complete. Step discovery ignores tmp directories, so an interrupted save can never
become the latest step; leftover tmp directories are deleted when the next manager
starts (`cleanup_tmp_directories`). Saves are synchronous: a returned `maybe_save`
is already on disk (no background thread to outlive a crash).

    ckpt = Checkpointer(workdir / "ckpt", save_every=500, keep=3)
    state, data_state, meta = ckpt.restore(abstract_state)       # latest step
    ckpt.maybe_save(step, state, data_state=train_iter.get_state(), meta=meta)
    ckpt.close()

Arrays that are not fully addressable by this process (multi-host sharded) are
recorded as unverified rather than gathered.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

_ITEMS = ("state", "data_state", "meta", "checksums")
UNVERIFIED = "unverified (not addressable by this process)"


class CheckpointError(RuntimeError):
  """A checkpoint exists but could not be restored (corrupt, truncated, an item
  missing, or not matching the requested structure). The message is one line that
  names the step, the item and what is wrong; the orbax error is kept as `__cause__`."""


def _canonical(obj: Any) -> Any:
  """JSON as it comes back from disk (tuples -> lists, keys -> str)."""
  return json.loads(json.dumps(obj))


def _json_digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True).encode()).hexdigest()


def _array_digest(x) -> str:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return UNVERIFIED
  a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
  return h.hexdigest()


def state_checksums(state: Any) -> dict[str, str]:
  """{leaf path: sha256 of dtype, shape and bytes} of a pytree of arrays."""
  return {jax.tree_util.keystr(path): _array_digest(x)
          for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}


class Checkpointer:
  """Saves every `save_every` steps, keeps the newest `keep` checkpoints."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int,
               keep: int = 3, save_concurrent_gb: int | None = None):
    """`save_concurrent_gb` caps the array bytes orbax stages at once while saving
    (its default, 96 GB, stages a copy of every array of a large model: the HF
    converter passes a small cap so a conversion needs no second copy in memory)."""
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every={save_every} and keep={keep} must be >= 1")
    # orbax wants an absolute path; resolving here also makes error messages
    # name the directory unambiguously.
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        # Only the fixed interval (plus orbax's preemption signal on multi-host
        # jobs). The default policy also saves the first step it sees, which
        # would put an off-schedule checkpoint at the resume step.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    handlers = None
    if save_concurrent_gb is not None:
      handlers = {"state": ocp.StandardCheckpointHandler(
                      save_concurrent_gb=save_concurrent_gb),
                  **{item: ocp.JsonCheckpointHandler() for item in _ITEMS[1:]}}
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=None if handlers else _ITEMS, item_handlers=handlers,
        options=options)

  def maybe_save(self, step: int, state: Any, *, data_state: dict,
                 meta: dict | None = None, force: bool = False) -> bool:
    """Saves if `step % save_every == 0` or `force`; returns whether it saved.

    `force` is for the end of a run. A forced save of a step that is already on
    disk (the last step fell on the schedule) is a no-op returning False rather
    than orbax's `StepAlreadyExistsError`: that checkpoint already holds this state.
    """
    step = int(step)
    if force and step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    meta = meta if meta is not None else {}
    checksums = {"state": state_checksums(state), "data_state": _json_digest(data_state),
                 "meta": _json_digest(meta)}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_state=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta),
        checksums=ocp.args.JsonSave(checksums),
    )
    return self._manager.save(step, args=args, force=force)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _step_or_latest(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint found in {self.directory}")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(available steps: {steps})")
    return step

  def _error(self, step: int, item: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint step {step} in {self.directory}: item "
                           f"{item!r}: {what}")

  def read_json(self, step: int | None = None) -> tuple[dict, dict]:
    """`(data_state, meta)` of `step` (default: the latest), checksum-verified; cheap,
    so a caller can check a run's identity before reading its arrays."""
    step = self._step_or_latest(step)
    for item in _ITEMS:
      if not os.path.isdir(os.path.join(self.directory, str(step), item)):
        raise self._error(step, item, "missing (the step directory lacks it)")
    items = ("data_state", "meta", "checksums")
    restored = {}
    for item in items:   # one at a time, so the error names the item that failed
      try:
        restored[item] = getattr(self._manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})), item)
      except Exception as e:  # json ValueError, a missing file, ...
        raise self._error(step, item, f"unreadable: {type(e).__name__}: "
                          f"{_short_reason(e)}") from e
    sums = restored["checksums"]
    if not isinstance(sums, dict) or set(sums) != {"state", "data_state", "meta"}:
      raise self._error(step, "checksums", "malformed (expected state, data_state "
                        "and meta checksums)")
    for item in ("data_state", "meta"):
      got = _json_digest(restored[item])
      if got != sums[item]:
        raise self._error(step, item, f"sha256 mismatch (stored {sums[item][:12]}, "
                          f"read {got[:12]}): the file was changed after it was saved")
    self._checksums = sums["state"]
    return restored["data_state"], restored["meta"]

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict, dict]:
    """Returns `(state, data_state, meta)` of `step` (default: the latest), every
    array and JSON item checked against the checksums saved with it.

    `abstract_state` gives the pytree structure, shapes and dtypes: a tree of
    `jax.ShapeDtypeStruct` or a concrete example state (whose shardings are used).

    Raises:
      FileNotFoundError: the directory holds no finished checkpoint, or not `step`.
      CheckpointError: one line: the step, the item, what is wrong.
    """
    step = self._step_or_latest(step)
    data_state, meta = self.read_json(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state))).state
    except Exception as e:  # tensorstore raises bare Exception, structure ValueError
      raise self._error(step, "state", f"unreadable: {type(e).__name__}: "
                        f"{_short_reason(e)}") from e
    stored, got = self._checksums, state_checksums(restored)
    if set(stored) != set(got):
      missing = sorted(set(got) - set(stored))[:3]
      raise self._error(step, "state", f"holds other arrays than requested "
                        f"(e.g. {missing or sorted(set(stored) - set(got))[:3]})")
    for path, digest in got.items():
      if UNVERIFIED not in (digest, stored[path]) and digest != stored[path]:
        raise self._error(step, "state", f"array {path}: sha256 mismatch (stored "
                          f"{stored[path][:12]}, read {digest[:12]}): corrupt on disk")
    return restored, data_state, meta

  def restore_fields(self, abstract: dict, step: int | None = None) -> tuple[dict, dict]:
    """Only some fields of the saved TrainState, `(fields, meta)`: e.g. `abstract =
    {"params": ..., "extra": ...}` for serving, so no optimizer state is read. Every
    restored array is checked against its stored checksum. orbax returns the stored
    shapes whatever `abstract` says: callers compare shapes themselves.

    Raises:
      FileNotFoundError: no finished checkpoint, or not `step`.
      CheckpointError: one line: the step, the item, what is wrong.
    """
    step = self._step_or_latest(step)
    _, meta = self.read_json(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(), abstract),
              partial_restore=True))).state
    except Exception as e:  # tensorstore raises bare Exception, structure ValueError
      raise self._error(step, "state", f"unreadable: {type(e).__name__}: "
                        f"{_short_reason(e)}") from e
    stored = self._checksums
    for path, digest in state_checksums(restored).items():
      # A dict's path "['params']['embed']" is the state's ".params['embed']".
      key = re.sub(r"^\['(\w+)'\]", r".\1", path)
      if key not in stored:
        raise self._error(step, "state", f"holds no array {key}")
      if UNVERIFIED not in (digest, stored[key]) and digest != stored[key]:
        raise self._error(step, "state", f"array {key}: sha256 mismatch (stored "
                          f"{stored[key][:12]}, read {digest[:12]}): corrupt on disk")
    return restored, meta

  def quarantine(self, step: int) -> str:
    """Moves a corrupt step out of the way (next to the directory, nothing deleted)
    so that the run can go on from an earlier step; returns where it went."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    target = os.path.join(self.directory + ".corrupt", f"{step}-{stamp}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until every started save (and old-step deletion) is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _short_reason(e: BaseException) -> str:
  # TensorStore errors append a multi-kilobyte JSON spec after the reason; the
  # reason names the file that failed. The full text stays on `__cause__`.
  text = str(e).split(" [tensorstore_spec=")[0].strip()
  return text.splitlines()[0][:300] if text else repr(e)
