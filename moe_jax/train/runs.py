"""A run's identity and its resume: which checkpoint, whether it is this run's.

    workdir/checkpoints/<step>/meta["identity"] = {model, data, train, objective,
                                                   fingerprint}   (resolved configs)
    resume:  newest step -> JSON items intact? -> same identity? -> arrays intact?
               corrupt:    say so, try the next older step (moved aside once one restores)
               different:  ConfigMismatch listing "train.lr: 0.002 -> 0.02", ...
    fresh:   workdir -> workdir.old-<timestamp> (nothing deleted), start over

Bookkeeping fields (how often to log, evaluate, checkpoint) do not change what is
trained, so they may differ on resume; every other field must match.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Callable

from moe_jax.train.checkpoint import CheckpointError, Checkpointer

# Fields that may change between a run and its resume: they change when things are
# logged or saved, not what is trained.
BOOKKEEPING = frozenset(
    f"train.{f}" for f in ("log_every", "eval_every", "eval_batches", "checkpoint_every",
                           "keep_checkpoints", "on_nonfinite", "max_skipped_steps"))


class ConfigMismatch(ValueError):
  """The work directory holds a run with a different configuration."""


def identity(mcfg, dcfg, tcfg, objective, fingerprint: str) -> dict[str, Any]:
  """The resolved configs of a run, as JSON (what every checkpoint stores)."""
  return json.loads(json.dumps({
      "model": dataclasses.asdict(mcfg), "data": dataclasses.asdict(dcfg),
      "train": dataclasses.asdict(tcfg),
      "objective": {"name": objective.name, **dict(objective.config)},
      "fingerprint": fingerprint}, default=str))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def differences(old: dict, new: dict) -> list[str]:
  """["train.lr: 0.002 -> 0.02", ...] for every non-bookkeeping field that differs."""
  a, b = _flat(old), _flat(new)
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
          for k in sorted(set(a) | set(b))
          if k not in BOOKKEEPING and a.get(k, "(absent)") != b.get(k, "(absent)")]


def move_aside(workdir: str | os.PathLike) -> str | None:
  """Renames a non-empty `workdir` to `<workdir>.old-<UTC timestamp>` (nothing is
  deleted) and returns the new path; None when there was nothing to move."""
  workdir = os.path.abspath(os.fspath(workdir))
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return None
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
  target = f"{workdir}.old-{stamp}"
  os.replace(workdir, target)
  return target


@dataclasses.dataclass
class Resumed:
  step: int
  state: Any
  data_state: dict
  meta: dict


def resume(ckpt: Checkpointer, abstract_state: Any, want: dict, data_keys: set[str], *,
           workdir: str, log: Callable[[str], None] = print) -> Resumed | None:
  """Restores the newest intact checkpoint of this run, or None when there is none.

  A corrupt step is reported in one line and the next older one is tried; once one
  restores, the corrupt newer steps are moved aside (`Checkpointer.quarantine`) so
  the run can write those steps again. A checkpoint of another configuration is
  refused (ConfigMismatch) rather than skipped: it is not corrupt, it is not ours.

  Raises:
    ConfigMismatch: the newest readable step was written with other configs.
    CheckpointError: checkpoints exist but none is intact (nothing is moved).
  """
  steps = ckpt.all_steps()
  failures: list[tuple[int, CheckpointError]] = []
  for step in reversed(steps):
    try:
      data_state, meta = ckpt.read_json(step)
      _check_identity(meta, want, step, workdir)
      if not isinstance(data_state, dict) or set(data_state) != data_keys:
        raise CheckpointError(
            f"checkpoint step {step} in {ckpt.directory}: item 'data_state': has keys "
            f"{sorted(data_state) if isinstance(data_state, dict) else data_state!r}, "
            f"the data pipeline needs {sorted(data_keys)}")
      state, data_state, meta = ckpt.restore(abstract_state, step)
    except CheckpointError as e:
      log(f"{e}; " + ("trying the previous checkpoint" if step != steps[0]
                      else "no older checkpoint"))
      failures.append((step, e))
      continue
    for bad, _ in failures:
      log(f"moved corrupt checkpoint step {bad} to {ckpt.quarantine(bad)}")
    if failures:
      log(f"fell back to step {step}, the newest intact checkpoint")
    return Resumed(step=step, state=state, data_state=data_state, meta=meta)
  if failures:
    raise CheckpointError(
        f"no intact checkpoint in {ckpt.directory} (steps {steps} all failed; newest: "
        f"{failures[0][1]}); start over with --fresh (train(..., fresh=True)), which "
        f"moves {workdir} aside")
  return None


def _check_identity(meta: dict, want: dict, step: int, workdir: str) -> None:
  have = meta.get("identity") if isinstance(meta, dict) else None
  diff = (differences(have, want) if have is not None
          else ["(the checkpoint was written without configs, by an older version)"])
  if diff:
    raise ConfigMismatch(
        f"{workdir} holds a run (checkpoint step {step}) with a different config; "
        f"refusing to resume it with this one. Differences (old -> new): "
        + "; ".join(diff) + ". Resume with the old config, use another workdir, or "
        "start over with --fresh (train(..., fresh=True)), which moves the old run to "
        f"{os.path.basename(workdir)}.old-<timestamp>")
