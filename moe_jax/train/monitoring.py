"""Training monitors: router load balance, loss fluctuation, threshold checks,
and a metrics writer (TensorBoard + JSONL).

The balance statistics are pure numpy functions of per-expert assignment
counts, so they work on a `jax.Array` pulled off device, on a saved `.npy`, or
in a notebook. `MetricsWriter` is the only stateful piece.

    writer = MetricsWriter(workdir)
    writer.scalars(step, {"loss": loss, "lr": lr})
    balance = writer.expert_load(step, expert_load)        # (L, E) counts
    writer.warn(step, check_thresholds(balance))
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from tensorboardX import SummaryWriter

log = logging.getLogger(__name__)

# The source's monitoring thresholds; each is an upper limit. `load_std` is
# the std of relative expert load (see `expert_balance`), `loss_fluctuation`
# is in nats (see `loss_fluctuation`), `p99_latency_ms` is serving latency.
THRESHOLDS = {"load_std": 0.15, "loss_fluctuation": 0.3, "p99_latency_ms": 500.0}


# ---------------------------------------------------------------- balance ---

def expert_balance(load) -> dict[str, float]:
  """Balance statistics of one MoE layer.

  Args:
    load: (E,) tokens assigned to each expert (counts, or any non-negative
      weights), a numpy or JAX array.

  Returns (mu = mean load, f_i = load of expert i):
    load_std       std(f_i / mu), population std. The source's "expert
                   activation balance std": its threshold (< 0.15) only makes
                   sense on this scale-free relative load.
    load_cv        std(f) / mu, the coefficient of variation of the raw load.
                   The same number as `load_std`; kept under the name most
                   papers use.
    max_vio        (max_i f_i - mu) / mu, MaxVio from Wang et al. 2024,
                   "Auxiliary-Loss-Free Load Balancing Strategy for MoE".
    dead_experts   number of experts with zero load.
    load_min_frac, load_max_frac   min / max of f_i / sum(f).
  A layer that received no tokens at all has undefined ratios: they are NaN.
  """
  load = np.asarray(load, dtype=np.float64)  # (E,)
  if load.ndim != 1 or load.size == 0:
    raise ValueError(f"expected (E,) expert load, got shape {load.shape}")
  mean, total = load.mean(), load.sum()
  with np.errstate(invalid="ignore", divide="ignore"):  # all-zero layer -> NaN
    relative = load / mean  # (E,)
    return {
        "load_std": float(relative.std()),
        "load_cv": float(load.std() / mean),
        "max_vio": float((load.max() - mean) / mean),
        "dead_experts": float(np.sum(load == 0)),
        "load_min_frac": float(load.min() / total),
        "load_max_frac": float(load.max() / total),
    }


def layer_balance(load) -> dict[str, Any]:
  """`expert_balance` of every layer of a (L, E) load.

  Returns each `expert_balance` key mapped to a list over layers, plus
  `mean_load_std` and `mean_max_vio` (means over layers) and
  `total_dead_experts` (summed over layers).
  """
  load = np.asarray(load)  # (L, E)
  if load.ndim != 2:
    raise ValueError(f"expected (L, E) expert load, got shape {load.shape}")
  per_layer = [expert_balance(layer_load) for layer_load in load]
  result: dict[str, Any] = {key: [b[key] for b in per_layer] for key in per_layer[0]}
  result["mean_load_std"] = float(np.mean(result["load_std"]))
  result["mean_max_vio"] = float(np.mean(result["max_vio"]))
  result["total_dead_experts"] = float(np.sum(result["dead_experts"]))
  return result


def balance_summary(load) -> dict[str, float]:
  """One scalar per `expert_balance` key for a whole (L, E) (or (E,)) load:
  the mean over layers, except `dead_experts` (total over layers) and
  `load_min_frac` / `load_max_frac` (min / max over layers). For a results
  table row or `check_thresholds`; `layer_balance` keeps the per-layer values.
  """
  per_layer = layer_balance(np.atleast_2d(np.asarray(load)))
  summary = {key: float(np.mean(per_layer[key]))
             for key in ("load_std", "load_cv", "max_vio")}
  summary["dead_experts"] = per_layer["total_dead_experts"]
  summary["load_min_frac"] = float(np.min(per_layer["load_min_frac"]))
  summary["load_max_frac"] = float(np.max(per_layer["load_max_frac"]))
  return summary


# ------------------------------------------------------------------- loss ---

def loss_fluctuation(losses: Sequence[float], window: int = 50) -> float:
  """Fluctuation of the training loss over the last `window` steps, given the
  loss of every step (the loop passes per-step losses: the mean of a logging
  window would hide most of the step-to-step noise this measures).

  Defined as the population std of the residuals after removing the
  least-squares linear trend from those losses. The trend is removed because a
  loss that falls steadily is healthy, and a plain std would report the fall
  itself as fluctuation; max - min would do the same and also hinge on a
  single outlier. Units are the loss's (nats), which is what the source's
  threshold of 0.3 is compared against. Fewer than 3 losses give 0.0 (a line
  fits any two points exactly); a NaN loss gives NaN.
  """
  if window < 1:
    raise ValueError(f"window={window} must be >= 1")
  y = np.asarray(losses, dtype=np.float64)[-window:]  # (T,)
  if y.size < 3:
    return 0.0
  t = np.arange(y.size, dtype=np.float64)
  slope, intercept = np.polyfit(t, y, deg=1)
  return float(np.std(y - (slope * t + intercept)))


# -------------------------------------------------------------- thresholds ---

def check_thresholds(metrics: Mapping[str, Any],
                     thresholds: Mapping[str, float] = THRESHOLDS) -> list[str]:
  """Human-readable warnings for every metric above its limit.

  A metric is checked against a threshold when its name equals the
  threshold's or ends in "/<name>" ("layer_3/load_std"), so the flat dicts
  `MetricsWriter` logs can be passed straight in; a list value (the per-layer
  lists of `layer_balance`) is checked per element. A non-finite value (a NaN
  loss fluctuation) always warns. Each message starts with "<metric>:", which
  `MetricsWriter.warn` uses to recognise repeats.
  """
  messages = []
  for name, value in metrics.items():
    limit = thresholds.get(name.rsplit("/", 1)[-1])
    if limit is None:
      continue
    # Per-layer lists (from `layer_balance`) are checked element by element.
    if isinstance(value, (list, tuple)):
      named = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    else:
      named = [(name, value)]
    for item_name, item in named:
      item = float(item)
      if not math.isfinite(item):
        messages.append(f"{item_name}: value is {item} (limit {limit:g})")
      elif item > limit:
        messages.append(f"{item_name}: {item:.4g} exceeds limit {limit:g}")
  return messages


# ------------------------------------------------------------------ writer ---

class MetricsWriter:
  """TensorBoard events under `workdir/tb`, plus `workdir/metrics.jsonl` and
  `self.history` so experiments can plot without TensorBoard.

  `metrics.jsonl` holds one JSON object per logged step,
  `{"step": 10, "train/loss": 2.3, "moe/layer_0/load_std": 0.1, ...}`, written
  when the next step is logged or on `flush()`/`close()` (the loop flushes each
  row as soon as it is computed). `history[name]` is a list of `(step, value)`.

  A resumed run continues both logs from its checkpoint: `resume_step=N` drops
  the JSONL rows after step N (written by the killed process after its last
  checkpoint, and about to be written again) and starts TensorBoard with
  `purge_step=N+1`, which makes TensorBoard discard the old events after N.

  Args:
    warn_every: a warning with the same key is emitted at most once every
      this many steps, so a condition that persists does not flood the log.
    resume_step: the step the run resumes from (0: a fresh run over a work
      directory whose rows, if any, are all dropped); None appends as is.
  """

  def __init__(self, workdir: str | os.PathLike, enabled_tensorboard: bool = True,
               *, warn_every: int = 100, resume_step: int | None = None):
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.warn_every = warn_every
    self.history: dict[str, list[tuple[int, float]]] = {}
    path = os.path.join(self.workdir, "metrics.jsonl")
    if resume_step is not None:
      truncate_jsonl(path, resume_step)
    self._tb = (SummaryWriter(logdir=os.path.join(self.workdir, "tb"),
                              purge_step=None if resume_step is None else resume_step + 1)
                if enabled_tensorboard else None)
    self._jsonl = open(path, "a")
    self._row: dict[str, Any] = {}  # the step being accumulated
    self._last_warned: dict[str, int] = {}

  def scalars(self, step: int, metrics: Mapping[str, Any], prefix: str = "train"):
    """Logs `{prefix}/{name}` for each float-convertible metric."""
    step = int(step)
    self._start_row(step)
    for name, value in metrics.items():
      tag = f"{prefix}/{name}" if prefix else name
      value = float(value)  # also pulls 0-d jax/numpy arrays off device
      self._row[tag] = value
      self.history.setdefault(tag, []).append((step, value))
      if self._tb is not None:
        self._tb.add_scalar(tag, value, global_step=step)

  def expert_load(self, step: int, load) -> dict[str, float]:
    """Logs per-layer router load of a (L, E) array; returns the scalars.

    The TensorBoard histogram of layer i has one bucket per expert holding
    its load, i.e. the distribution of assignments over expert ids, which
    shows which experts are hot rather than only how uneven they are.
    """
    load = np.asarray(load, dtype=np.float64)  # (L, E)
    balance = layer_balance(load)
    flat = {f"layer_{i}/{key}": balance[key][i]
            for i in range(load.shape[0])
            for key in ("load_std", "max_vio", "dead_experts")}
    flat.update({key: balance[key] for key in
                 ("mean_load_std", "mean_max_vio", "total_dead_experts")})
    self.scalars(step, flat, prefix="moe")
    if self._tb is not None:
      expert_ids = np.arange(load.shape[1], dtype=np.float64)  # (E,)
      for i, layer_load in enumerate(load):
        self._tb.add_histogram_raw(
            f"moe/layer_{i}/load", min=0.0, max=float(expert_ids[-1]),
            num=float(layer_load.sum()), sum=float(expert_ids @ layer_load),
            sum_squares=float(expert_ids**2 @ layer_load),
            bucket_limits=(expert_ids + 0.5).tolist(),  # bucket e = (e-.5, e+.5]
            bucket_counts=layer_load.tolist(), global_step=int(step))
    return {f"moe/{name}": value for name, value in flat.items()}

  def warn(self, step: int, messages: Sequence[str]) -> list[str]:
    """Logs warnings, rate-limited per key; returns those actually emitted.

    A message's key is its text before the first ":" (the metric name for
    `check_thresholds` messages), or the whole text. Warnings go to
    `logging` rather than `warnings.warn`: they report the state of a run,
    not a misuse of the code. Emitted ones are also recorded as TensorBoard
    text and in the step's JSONL row under "warnings".
    """
    step = int(step)
    emitted = []
    for message in messages:
      key = message.split(":", 1)[0]
      last = self._last_warned.get(key)
      if last is not None and step - last < self.warn_every:
        continue
      self._last_warned[key] = step
      emitted.append(message)
      log.warning("step %d: %s", step, message)
      if self._tb is not None:
        self._tb.add_text("warnings", message, global_step=step)
    if emitted:
      self._start_row(step)
      self._row.setdefault("warnings", []).extend(emitted)
    return emitted

  def flush(self):
    self._write_row()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    self.flush()
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _start_row(self, step: int):
    if self._row and self._row["step"] != step:
      self._write_row()
    if not self._row:
      self._row = {"step": step}

  def _write_row(self):
    # Flushed per row so a crashed run still leaves every finished step on
    # disk. NaN is written as the bare token NaN, which Python's json reads.
    if self._row:
      self._jsonl.write(json.dumps(self._row) + "\n")
      self._jsonl.flush()
      self._row = {}


def truncate_jsonl(path: str, after_step: int) -> int:
  """Drops the rows of a metrics.jsonl whose step is after `after_step` (atomically:
  a new file renamed over the old); returns how many were dropped. A torn last line
  (a kill mid-write) is dropped too."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if int(row.get("step", 0)) > after_step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return dropped
