"""Training checkpoints: a thin wrapper around orbax's `CheckpointManager`.

One checkpoint step holds three items, written with orbax composite args:
  state       the train-state pytree (params, optax state, router bias, rng key
              data, step) via `StandardSave` / `StandardRestore`;
  data_state  the input iterator's JSON state (`it.get_state()`) via `JsonSave`,
              so a resumed run sees exactly the batches it would have seen;
  meta        JSON run metadata (config, corpus fingerprint, losses so far).

Atomicity is orbax's: on a local filesystem each step is written into
`<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every item is
complete (on GCS a commit marker plays that role). Step discovery ignores tmp
directories, so an interrupted save can never become the latest step; leftover
tmp directories are deleted when the next manager starts (`cleanup_tmp_directories`).

Saves are synchronous: at research scale a blocking save is short, and it means
a returned `maybe_save` is already on disk (no background thread to outlive a
crash). `wait()` is kept so callers do not depend on that choice.

    ckpt = Checkpointer(workdir / "ckpt", save_every=500, keep=3)
    if ckpt.latest_step() is not None:
      state, data_state, meta = ckpt.restore(abstract_state)
      train_iter.set_state(data_state)
    ...
    ckpt.maybe_save(step, state, data_state=train_iter.get_state(), meta=meta)
    ...
    ckpt.maybe_save(step, state, data_state=..., meta=..., force=True)  # end of run
    ckpt.close()
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

_ITEMS = ("state", "data_state", "meta")


class CheckpointError(RuntimeError):
  """A checkpoint exists but could not be restored (corrupt, truncated, or not
  matching the requested structure). The orbax error is kept as `__cause__`."""


class Checkpointer:
  """Saves every `save_every` steps, keeps the newest `keep` checkpoints."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int,
               keep: int = 3):
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
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=_ITEMS, options=options)

  def maybe_save(self, step: int, state: Any, *, data_state: dict,
                 meta: dict | None = None, force: bool = False) -> bool:
    """Saves if `step % save_every == 0` or `force`; returns whether it saved.

    `force` is for the end of a run and for stopping on a NaN loss. A forced
    save of a step that is already on disk (the last step fell on the
    schedule) is a no-op returning False rather than orbax's
    `StepAlreadyExistsError`: that checkpoint already holds this state.
    """
    step = int(step)
    if force and step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_state=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta if meta is not None else {}),
    )
    return self._manager.save(step, args=args, force=force)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict, dict]:
    """Returns `(state, data_state, meta)` of `step` (default: the latest).

    `abstract_state` gives the pytree structure, shapes and dtypes: a tree of
    `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(init_fn, rng)`) or a concrete
    example state. Arrays come back with exactly the saved bits when the
    requested dtypes equal the saved ones; a different requested dtype is
    cast by orbax (e.g. restoring f32 params as bf16), not rejected.

    Raises:
      FileNotFoundError: the directory holds no finished checkpoint, or not `step`.
      CheckpointError: the checkpoint exists but reading it failed.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint found in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory} "
          f"(available steps: {steps})")
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_state=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    )
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # tensorstore raises bare Exception, json ValueError, ...
      raise CheckpointError(
          f"failed to restore checkpoint step {step} from {self.directory}: "
          f"{type(e).__name__}: {_short_reason(e)} (the checkpoint is corrupt "
          f"or does not match `abstract_state`)") from e
    return restored.state, restored.data_state, restored.meta

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
  return text.splitlines()[0] if text else repr(e)
