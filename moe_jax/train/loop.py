"""The one training loop: data -> jitted guarded step -> logs, checkpoints, evaluation.

    train(mcfg, dcfg, tcfg, workdir, objective=..., frozen=...)
      resume newest intact checkpoint of the SAME configs (runs.py) or start fresh
      for step: state, metrics = step(state, batch, frozen)      (objective's loss)
        every log_every / checkpoint_every: pull metrics, refuse non-finite steps,
          write + flush the row (JSONL, TensorBoard), checkpoint (checksummed)
      evaluate held-out per domain (also after an exception), return RunResult

Everything needed to resume exactly, params, optimizer state, `extra` (router bias,
QAT groups), step, RNG and the data iterator's position, is in each checkpoint, with
the resolved configs; `frozen` inputs (a teacher, a LoRA base) are not: the caller
passes them again.

The objective API (objective.py) is what plugs new kinds of training in:

    Objective(name, init, loss, evaluate=None, config={}, batch_keys=("inputs", "targets"),
              schedule=None)
      init(rng) -> (params, extra)                    # trained, carried
      loss(params, extra, batch, frozen, rng, step) -> (loss, (metrics, extra'))
      evaluate(params, extra, batch, frozen) -> {"nll_sum", "correct", "tokens"}

  language model  lm_objective(mcfg, tcfg, seq_len)        (the default)
  QAT             lm_objective(..., transform=fake-quantize; extra["groups"])
  distillation    params {"student", "proj"}; frozen {"teacher", "rules", "plan"}
  LoRA            params = adapters; frozen = base params; loss merges them
  PPO / GRPO      frozen = reference policy; `rng` samples the rollouts inside the
                  loss, or batches come from a rollout iterator (train_iter=)
  reward model    params = {backbone, head}; batch_keys=("chosen", "rejected")

For example, LoRA on a frozen base:

    def loss(adapters, extra, batch, frozen, rng, step):
      params = merge(frozen["base"], adapters)                 # W + B @ A
      total, out = objective.loss_fn(params, {}, batch, mcfg, tcfg)
      return total, ({"ce": out["ce"]}, extra)
    lora = Objective("lora", init=lambda rng: (init_adapters(rng), {}), loss=loss)
    train(mcfg, dcfg, tcfg, workdir, objective=lora, frozen={"base": base_params})

Non-finite steps (loss, gradient norm or updated state) never change the state (the
guard is in the jitted step), so no checkpoint holds NaN. `tcfg.on_nonfinite`:
"stop" raises TrainingDiverged naming the last (finite) checkpoint; "skip" drops the
step and goes on, and stops after `max_skipped_steps` consecutive refusals.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from moe_jax import data as data_lib
from moe_jax import sharding
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.train import monitoring, runs
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.objective import Objective, lm_objective
from moe_jax.train.step import TrainState, abstract_state, compile_steps, new_state

FLUCTUATION_WINDOW = 50      # per-step losses in the loss-fluctuation window


class TrainingDiverged(RuntimeError):
  """A step was not finite (loss, gradient norm or update); no checkpoint holds it."""


@dataclasses.dataclass
class RunResult:
  state: TrainState
  history: list[dict[str, float]]        # one row per logged step
  eval: dict[str, dict[str, float]]      # domain -> loss, perplexity, accuracy
  eval_load: np.ndarray                  # (L_moe, E) expert load on the held-out text
  load_history: list[tuple[int, list]]   # (step, (L_moe, E) load) per log step
  tokens_per_s: float                    # steps trained in this process, compile
                                         # excluded; NaN when none were
  fingerprint: str                       # corpus fingerprint
  configs: dict[str, Any] = dataclasses.field(default_factory=dict)  # resolved, JSON
  steps_trained: int = 0                 # in this process
  skipped: int = 0                       # non-finite steps refused, whole run
  data_state: dict = dataclasses.field(default_factory=dict)   # iterator at the end
  resumed_from: int | None = None

  @property
  def model(self) -> ModelConfig:
    """The resolved model config the run trained (overrides applied)."""
    return ModelConfig(**_from_json(self.configs["model"]))


def _from_json(d: dict) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def evaluate(evaluate_fn, state, dcfg: data_lib.DataConfig, corpus, mesh, max_batches: int,
             eval_data=None, keys=("inputs", "targets")):
  """Held-out loss, perplexity, next-token accuracy and (MoE) mean number of active
  experts per token per domain: the corpus's held-out split of each of dcfg.domains,
  or `eval_data` {domain: [batch, ...]} (entries `keys` of each batch are used)."""
  results, load = {}, 0.0
  domains = eval_data if eval_data is not None else {
      d: functools.partial(data_lib.make_eval_batches, dcfg, d, max_batches, corpus=corpus)
      for d in dcfg.domains}
  for domain, batches in domains.items():
    totals = {"nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    k_sum = 0.0
    for batch in batches() if callable(batches) else batches:
      out = jax.device_get(evaluate_fn(state, _to_device(batch, mesh, keys)))
      for k in totals:
        totals[k] += float(out[k])
      load = load + out.get("load", 0.0)
      k_sum = k_sum + out.get("k_sum", 0.0)
    loss = totals["nll_sum"] / max(totals["tokens"], 1.0)
    results[domain] = {"loss": loss, "perplexity": float(np.exp(loss)),
                       "accuracy": totals["correct"] / max(totals["tokens"], 1.0)}
    if np.ndim(k_sum):                                  # (L_moe,): a MoE model
      results[domain]["effective_k"] = float(np.mean(k_sum)) / max(totals["tokens"], 1.0)
  return results, np.asarray(load)


def _to_device(batch: dict[str, np.ndarray], mesh, keys=("inputs", "targets")
               ) -> dict[str, jax.Array]:
  """Assemble the global batch from this process's rows, split over the data axes."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, v)
          for k, v in batch.items() if k in keys}


def train(mcfg: ModelConfig, dcfg: data_lib.DataConfig, tcfg: TrainConfig,
          workdir: str | os.PathLike, *, objective: Objective | None = None, frozen=None,
          mesh=None, fresh: bool = False, progress: bool = True, desc: str = "train",
          stop_at: int | None = None, corpus=None, init_params=None,
          data_state: dict | None = None, train_iter=None, eval_data=None,
          log: Callable[[str], None] = print) -> RunResult:
  """Train (or resume) one run in `workdir`.

  Args:
    objective: what to train (default: the language model of `mcfg`).
    frozen: read-only input of every step (a teacher), not checkpointed.
    fresh: move an existing `workdir` to `<workdir>.old-<timestamp>` and start over.
    init_params: the default objective starts from these params (new optimizer).
    data_state: where a fresh run's data iterator starts (a later stage continuing
      an earlier stage's stream); a resumed run uses its checkpoint's.
    train_iter: an iterator with get_state / set_state to use instead of the
      corpus stream (rollouts, preference pairs, kg cloze rows).
    eval_data: {domain: [batch, ...]} held-out batches (with the objective's
      batch_keys) to evaluate instead of the corpus's held-out split.
    stop_at: end after that step (with a checkpoint), as an interrupted run would.
  """
  if fresh and (moved := runs.move_aside(workdir)):
    log(f"--fresh: moved the old run to {moved}")
  os.makedirs(workdir, exist_ok=True)
  workdir = os.path.abspath(os.fspath(workdir))
  mesh = mesh or sharding.single_device_mesh()
  corpus = corpus or data_lib.corpus_from_config(dcfg)
  if mcfg.vocab_size < data_lib.get_tokenizer(dcfg.tokenizer).vocab_size:
    raise ValueError(f"ModelConfig.vocab_size={mcfg.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({dcfg.tokenizer!r})")
  if objective is not None and init_params is not None:
    raise ValueError("pass init_params to the objective, not to train(), when giving "
                     "an objective")
  objective = objective or lm_objective(mcfg, tcfg, dcfg.seq_len, params=init_params)
  shardings = sharding.logical_shardings(abstract_state(objective, tcfg), mesh)
  state = jax.device_put(new_state(objective, tcfg), shardings)
  step_fn, eval_fn = compile_steps(objective, tcfg, mesh, shardings)
  frozen = _place_frozen(frozen, mesh)
  data_iter = train_iter or data_lib.make_train_iterator(dcfg, corpus=corpus)
  if data_state is not None:
    data_iter.set_state(data_state)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tcfg.checkpoint_every,
                      keep=tcfg.keep_checkpoints)
  ident = runs.identity(mcfg, dcfg, tcfg, objective, corpus.fingerprint())
  try:
    resumed = runs.resume(ckpt, state, ident, set(data_iter.get_state()),
                          workdir=workdir, log=log)
  except BaseException:
    ckpt.close()
    raise
  meta: dict[str, Any] = {"history": [], "load_history": [], "recent_losses": [],
                          "skipped": 0}
  if resumed is not None:
    state = jax.device_put(resumed.state, shardings)
    data_iter.set_state(resumed.data_state)
    meta.update(resumed.meta)
    log(f"resuming from step {resumed.step} ({workdir})")
  start = int(state.step)
  end = min(tcfg.steps, stop_at or tcfg.steps)
  # One writer per process; the other hosts' logs go to a subfolder.
  writer = monitoring.MetricsWriter(
      workdir if jax.process_index() == 0
      else os.path.join(workdir, f"process_{jax.process_index()}"), resume_step=start)
  run = _Run(tcfg=tcfg, writer=writer, ckpt=ckpt, history=meta["history"],
             load_history=[tuple(x) for x in meta["load_history"]],
             recent=collections.deque(meta["recent_losses"], maxlen=FLUCTUATION_WINDOW),
             skipped=int(meta["skipped"]), tokens_per_step=dcfg.batch_size * dcfg.seq_len)

  def evaluate_now(state):
    if eval_fn is None:
      return {}, np.zeros((0,))
    return evaluate(lambda s, b: eval_fn(s, b, frozen), state, dcfg, corpus, mesh,
                    tcfg.eval_batches, eval_data,
                    objective.batch_keys if eval_data is not None else ("inputs", "targets"))

  bar = tqdm(total=tcfg.steps, initial=start, desc=desc, disable=not progress,
             unit="step", dynamic_ncols=True)
  window: list[dict[str, Any]] = []
  step = start
  try:
    t_window = time.perf_counter()
    for step in range(start + 1, end + 1):
      batch = _to_device(next(data_iter), mesh, objective.batch_keys)
      state, metrics = step_fn(state, batch, frozen)
      window.append(metrics)
      if step % tcfg.log_every and step % tcfg.checkpoint_every and step != end:
        continue
      # Wait for the window's steps (dispatch is asynchronous) before timing them.
      window = jax.device_get(window)
      elapsed = time.perf_counter() - t_window
      row = run.log_window(step, window, elapsed, timed=step - len(window) > start)
      bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}",
                      tok_s=f"{row['tokens_per_s']:,.0f}")
      bar.update(len(window))
      window = []
      if step == end or step % tcfg.checkpoint_every == 0:
        ckpt.maybe_save(step, state, data_state=data_iter.get_state(), force=step == end,
                        meta={"identity": ident, **run.meta()})
      if tcfg.eval_every and step % tcfg.eval_every == 0 and step != end and eval_fn:
        results, _ = evaluate_now(state)
        writer.scalars(step, _flatten(results), prefix="eval")
        writer.flush()
      t_window = time.perf_counter()
  except BaseException as e:
    # Keep what the run learned: the steps computed before the error get their row
    # (the state is finite: the step's guard), then the held-out evaluation.
    _finish_after_error(run, window, state, evaluate_now, e, log)
    bar.close()
    ckpt.close()
    writer.close()
    raise
  bar.close()
  ckpt.close()

  results, eval_load = evaluate_now(state)
  if results and (step > start or not _has_eval_row(writer, end)):
    writer.scalars(end, _flatten(results), prefix="eval")
  writer.close()
  return RunResult(state=state, history=run.history, eval=results, eval_load=eval_load,
                   load_history=run.load_history,
                   tokens_per_s=run.timed_tokens / run.timed_seconds if run.timed_seconds
                   else float("nan"),
                   fingerprint=corpus.fingerprint(), configs=ident,
                   steps_trained=end - start if end > start else 0, skipped=run.skipped,
                   data_state=data_iter.get_state(),
                   resumed_from=resumed.step if resumed else None)


@dataclasses.dataclass
class _Run:
  """The loop's host-side bookkeeping: rows, the non-finite policy, throughput."""
  tcfg: TrainConfig
  writer: monitoring.MetricsWriter
  ckpt: Checkpointer
  history: list
  load_history: list
  recent: collections.deque
  skipped: int
  tokens_per_step: int
  consecutive: int = 0
  timed_tokens: int = 0
  timed_seconds: float = 0.0

  def meta(self) -> dict[str, Any]:
    return {"history": self.history, "load_history": self.load_history,
            "recent_losses": list(self.recent), "skipped": self.skipped}

  def log_window(self, step: int, window: list[dict], elapsed: float, timed: bool) -> dict:
    """Applies the non-finite policy to the window's steps, then writes and flushes
    one row (mean of the finite steps; `_count` metrics summed). Raises
    TrainingDiverged after writing the row of the steps before the refused one."""
    first = step - len(window) + 1
    good = []
    for i, m in enumerate(window):
      if bool(m["finite"]):
        self.consecutive = 0
        good.append(m)
        self.recent.append(float(m["loss"]))
        continue
      self.skipped += 1
      self.consecutive += 1
      stop = (self.tcfg.on_nonfinite == "stop"
              or self.consecutive >= self.tcfg.max_skipped_steps)
      if stop:
        if good:
          self._write(first + i - 1, good, elapsed, timed=False)
        raise TrainingDiverged(self._diverged(first + i, m))
    if timed:     # the first window of a process includes compilation
      self.timed_tokens += self.tokens_per_step * len(window)
      self.timed_seconds += elapsed
    return self._write(step, good or window, elapsed, timed)

  def _write(self, step: int, window: list[dict], elapsed: float, timed: bool) -> dict:
    row = {k: float(np.sum([m[k] for m in window]) if k.endswith("_count")
                    else np.mean([m[k] for m in window]))
           for k in window[0] if k not in ("load", "finite")}
    row.update(step=step, steps=len(window), skipped=self.skipped,
               tokens_per_s=self.tokens_per_step * len(window) / max(elapsed, 1e-9))
    if "load" in window[0]:
      load = np.mean([m["load"] for m in window], axis=0)                # (L, E)
      row.update(monitoring.balance_summary(load))
      self.load_history.append((step, load.tolist()))
      self.writer.expert_load(step, load)
    row["loss_fluctuation"] = monitoring.loss_fluctuation(list(self.recent),
                                                          FLUCTUATION_WINDOW)
    self.history.append(row)
    self.writer.scalars(step, {k: v for k, v in row.items() if k != "steps"})
    self.writer.warn(step, monitoring.check_thresholds(row))
    self.writer.flush()               # on disk before the checkpoint of this step
    return row

  def _diverged(self, step: int, m: dict) -> str:
    what = ", ".join(f"{k} {float(m[k]):.4g}" for k in ("loss", "grad_norm"))
    if np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"])):
      what += " (finite, but the updated parameters or optimizer state are not)"
    policy = (f"train.on_nonfinite='stop'" if self.tcfg.on_nonfinite == "stop" else
              f"{self.consecutive} consecutive non-finite steps "
              f"(train.max_skipped_steps={self.tcfg.max_skipped_steps})")
    last = self.ckpt.latest_step()
    where = (f"The last checkpoint, step {last} in {self.ckpt.directory}, is finite (a "
             f"refused step never reaches the state) and resumes." if last is not None
             else f"No checkpoint was written yet (in {self.ckpt.directory}).")
    return (f"step {step} was not finite: {what}; the step was refused and the run "
            f"stopped ({policy}). {where}")


def _finish_after_error(run: _Run, window, state, evaluate_now, error, log):
  try:
    if window and not isinstance(error, TrainingDiverged):
      last = run.history[-1]["step"] if run.history else int(state.step) - len(window)
      good = [m for m in jax.device_get(window) if bool(m["finite"])]
      if good:
        run._write(last + len(window), good, 1.0, timed=False)
  except Exception as e:       # the error may have left the window unreadable
    log(f"could not write the last row after the error: {type(e).__name__}: {e}")
  try:
    results, _ = evaluate_now(state)
    if results:
      run.writer.scalars(int(state.step), _flatten(results), prefix="eval")
      run.writer.flush()
  except Exception as e:       # e.g. the failing step consumed (donated) the state
    log(f"could not evaluate after the error: {type(e).__name__}: {e}")


def _place_frozen(frozen, mesh):
  """Frozen inputs already laid out on the mesh stay as they are (a sharded LoRA
  base); anything else is replicated over it, so the step sees one device set."""
  devices = set(mesh.devices.flat)
  def place(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x
    return jax.device_put(x, sharding.replicated(mesh))
  return jax.tree.map(place, frozen)


def _has_eval_row(writer: monitoring.MetricsWriter, step: int) -> bool:
  path = os.path.join(writer.workdir, "metrics.jsonl")
  with open(path) as f:
    return any(r.get("step") == step and any(k.startswith("eval/") for k in r)
               for r in map(json.loads, f))


def _flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
  return {f"{domain}/{k}": v for domain, r in results.items() for k, v in r.items()}
