"""Quantization-aware fine-tuning: the usual AdamW step on a loss that sees the
fake-quantized weights.

    loss(params) = loss_fn(fake_quantize_params(params, qcfg, groups), ...)

The forward pass runs on quantize-dequantized weights; the backward pass reaches the
full-precision weights through the clipped straight-through estimator (core.py), and
AdamW updates those. `groups`, the high-variance channel masks, are an argument of
the jitted step (same shapes, new values: no retrace), recomputed from the current
weights every `regroup_every` steps ("dynamic" grouping) or never (0: fixed at the
start). QAT here fine-tunes a trained full-precision model, the usual practice and
much cheaper than training quantized from scratch; it is a short plain loop (no
checkpoints: a fine-tune of tens of steps) over the project's train step and data.
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np

from moe_jax import data as data_lib
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.quant.config import QuantConfig
from moe_jax.quant.core import compute_groups, fake_quantize_params
from moe_jax.train import step as step_lib


def qat_objective(groups, qcfg: QuantConfig | None):
  """loss_fn on fake-quantized parameters (plain loss_fn when qcfg is None)."""
  def objective(params, *args):
    if qcfg is not None:
      params = fake_quantize_params(params, qcfg, groups)
    return step_lib.loss_fn(params, *args)
  return objective


def qat_step(state, batch, groups, *, mcfg: ModelConfig, tcfg: TrainConfig,
             qcfg: QuantConfig | None):
  return step_lib.train_step(state, batch, mcfg=mcfg, tcfg=tcfg,
                             objective=qat_objective(groups, qcfg))


def finetune(params, router_bias, mcfg: ModelConfig, dcfg: data_lib.DataConfig,
             tcfg: TrainConfig, qcfg: QuantConfig | None, *, regroup_every: int = 0,
             corpus=None, log=print):
  """Fine-tune `params` for tcfg.steps with fake quantization (qcfg None: a
  full-precision control with the same steps). Returns (params, router_bias, groups
  at the end, history). history rows: step, loss, and at each regrouping the share
  of channels that changed group."""
  corpus = corpus or data_lib.corpus_from_config(dcfg)
  state = step_lib.init_state(mcfg, tcfg, dcfg.seq_len, params)
  state = state.replace(router_bias=jax.tree.map(np.asarray, router_bias))
  data_iter = data_lib.make_train_iterator(dcfg, corpus=corpus)
  regroup = jax.jit(functools.partial(compute_groups, qcfg=qcfg)) if qcfg else None
  groups = regroup(state.params) if qcfg else {}
  train = jax.jit(functools.partial(qat_step, mcfg=mcfg, tcfg=tcfg, qcfg=qcfg),
                  donate_argnums=0)
  history, t0 = [], time.perf_counter()
  for i in range(1, tcfg.steps + 1):
    row = {}
    if qcfg and regroup_every and i > 1 and (i - 1) % regroup_every == 0:
      new = regroup(state.params)
      changed = sum(int(np.sum(np.asarray(new[k]) != np.asarray(groups[k]))) for k in new)
      row["regrouped_%"] = 100.0 * changed / sum(g.size for g in new.values())
      groups = new
    batch = {k: v for k, v in next(data_iter).items() if k in ("inputs", "targets")}
    state, metrics = train(state, batch, groups)
    if i % tcfg.log_every == 0 or i == tcfg.steps or row:
      row.update(step=i, loss=float(metrics["ce"]))
      history.append(row)
      if log and i % tcfg.log_every == 0:
        log(f"  qat step {i}/{tcfg.steps} ce {row['loss']:.3f} "
            f"({time.perf_counter() - t0:.0f}s)")
  return state.params, state.router_bias, groups, history
