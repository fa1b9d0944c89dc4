"""The training loop: data -> jitted step -> metrics, checkpoints, evaluation.

`train(model_cfg, data_cfg, train_cfg, workdir)` runs (or resumes) one run and
returns its history and per-domain evaluation. Everything it needs to resume
exactly, parameters, optimizer state, router bias, step, RNG and the data
iterator's position, is in each checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from moe_jax import data as data_lib
from moe_jax import sharding
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.train import monitoring
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.step import TrainState, init_state, jit_steps, state_shardings


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is left intact."""


@dataclasses.dataclass
class RunResult:
  state: TrainState
  history: list[dict[str, float]]        # one row per logged step
  eval: dict[str, dict[str, float]]      # domain -> loss, perplexity, accuracy
  eval_load: np.ndarray                  # (L_moe, E) expert load on the held-out text
  load_history: list[tuple[int, list]]   # (step, (L_moe, E) load) per log step
  tokens_per_s: float                    # training throughput, compile time excluded
  fingerprint: str                       # corpus fingerprint


def evaluate(evaluate_fn, state, dcfg: data_lib.DataConfig, corpus, mesh, max_batches: int):
  """Held-out loss, perplexity, next-token accuracy and (MoE) mean number of active
  experts per token per domain."""
  results, load = {}, 0.0
  for domain in dcfg.domains:
    totals = {"nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    k_sum = 0.0
    for batch in data_lib.make_eval_batches(dcfg, domain, max_batches, corpus=corpus):
      out = jax.device_get(evaluate_fn(state, _to_device(batch, mesh)))
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


def _to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assemble the global batch from this process's rows, split over the data axes."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, v)
          for k, v in batch.items() if k in ("inputs", "targets")}


def train(mcfg: ModelConfig, dcfg: data_lib.DataConfig, tcfg: TrainConfig,
          workdir: str | os.PathLike, *, mesh=None, resume: bool = True,
          progress: bool = True, desc: str = "train", stop_at: int | None = None,
          corpus=None, init_params=None) -> RunResult:
  """Train (or resume) one run in `workdir`. `init_params` starts from an earlier
  stage's parameters (with a fresh optimizer). `stop_at` ends the run early after that
  step (with a checkpoint), as an interrupted run would; used by the resume test."""
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh or sharding.single_device_mesh()
  corpus = corpus or data_lib.corpus_from_config(dcfg)
  if mcfg.vocab_size < data_lib.get_tokenizer(dcfg.tokenizer).vocab_size:
    raise ValueError(f"ModelConfig.vocab_size={mcfg.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({dcfg.tokenizer!r})")
  shardings = state_shardings(mcfg, tcfg, dcfg.seq_len, mesh)
  state = init_state(mcfg, tcfg, dcfg.seq_len, init_params)
  state = jax.device_put(state, shardings)
  train_step, eval_step = jit_steps(mcfg, tcfg, mesh, shardings)
  data_iter = data_lib.make_train_iterator(dcfg, corpus=corpus)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tcfg.checkpoint_every,
                      keep=tcfg.keep_checkpoints)
  # One writer per process; the other hosts' logs go to a subfolder.
  writer = monitoring.MetricsWriter(
      workdir if jax.process_index() == 0
      else os.path.join(workdir, f"process_{jax.process_index()}"))

  history: list[dict[str, float]] = []
  load_history: list[tuple[int, list]] = []
  if resume and ckpt.latest_step() is not None:
    state, data_state, meta = ckpt.restore(state)
    state = jax.device_put(state, shardings)
    data_iter.set_state(data_state)
    history, load_history = meta["history"], meta["load_history"]
  meta = {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
          "fingerprint": corpus.fingerprint()}

  start = int(state.step)
  end = min(tcfg.steps, stop_at or tcfg.steps)
  tokens_per_step = dcfg.batch_size * dcfg.seq_len
  bar = tqdm(total=tcfg.steps, initial=start, desc=desc, disable=not progress,
             unit="step", dynamic_ncols=True)
  window: list[dict[str, Any]] = []
  timed_tokens, timed_seconds = 0, 0.0
  t_window = time.perf_counter()
  for step in range(start + 1, end + 1):
    state, metrics = train_step(state, _to_device(next(data_iter), mesh))
    window.append(metrics)
    if step % tcfg.log_every and step % tcfg.checkpoint_every and step != end:
      continue
    window = jax.device_get(window)
    losses = [float(m["loss"]) for m in window]
    if not np.all(np.isfinite(losses)):
      bar.close()
      writer.close()
      ckpt.close()
      last = ckpt.latest_step()
      raise TrainingDiverged(
          f"loss became {losses[-1]} by step {step}; stopping. " + (
              f"The last good checkpoint (step {last}) in {ckpt.directory} is intact."
              if last is not None else "No checkpoint was written yet (the last good "
              f"checkpoint would be in {ckpt.directory})."))
    elapsed = time.perf_counter() - t_window
    if step - len(window) > start:     # the first window of a run includes compilation
      timed_tokens += tokens_per_step * len(window)
      timed_seconds += elapsed
    row = {k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "load"}
    row.update(step=step, tokens_per_s=tokens_per_step * len(window) / elapsed)
    if "load" in window[0]:
      load = np.mean([m["load"] for m in window], axis=0)                # (L, E)
      row.update(monitoring.balance_summary(load))
      load_history.append((step, load.tolist()))
      writer.expert_load(step, load)
    row["loss_fluctuation"] = monitoring.loss_fluctuation(
        [h["loss"] for h in history] + [row["loss"]])
    history.append(row)
    writer.scalars(step, row)
    writer.warn(step, monitoring.check_thresholds(row))
    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
    bar.update(len(window))
    window, t_window = [], time.perf_counter()
    if step == end or step % tcfg.checkpoint_every == 0:
      ckpt.maybe_save(step, state, data_state=data_iter.get_state(),
                      meta={**meta, "history": history, "load_history": load_history},
                      force=step == end)
    if tcfg.eval_every and step % tcfg.eval_every == 0 and step != end:
      results, _ = evaluate(eval_step, state, dcfg, corpus, mesh, tcfg.eval_batches)
      writer.scalars(step, _flatten(results), prefix="eval")
  bar.close()
  ckpt.close()

  results, eval_load = evaluate(eval_step, state, dcfg, corpus, mesh, tcfg.eval_batches)
  writer.scalars(end, _flatten(results), prefix="eval")
  writer.close()
  return RunResult(state=state, history=history, eval=results, eval_load=eval_load,
                   load_history=load_history,
                   tokens_per_s=timed_tokens / timed_seconds if timed_seconds else
                   float(history[-1]["tokens_per_s"]) if history else 0.0,
                   fingerprint=corpus.fingerprint())


def _flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
  return {f"{domain}/{k}": v for domain, r in results.items() for k, v in r.items()}
