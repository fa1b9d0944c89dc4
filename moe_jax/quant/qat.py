"""Quantization-aware fine-tuning: the one training loop on a loss that sees the
fake-quantized weights.

    extra["groups"] <- compute_groups(params)   at steps k * regroup_every (k >= 1)
    loss(params)     = loss_fn(fake_quantize_params(params, qcfg, groups), ...)

The forward pass runs on quantize-dequantized weights; the backward pass reaches the
full-precision weights through the clipped straight-through estimator (core.py), and
AdamW updates those. `groups`, the high-variance channel masks, live in the train
state's `extra`, so they are checkpointed and a resumed fine-tune is exact: they are
recomputed inside the jitted step (a `lax.cond`, no retrace) from the current weights
every `regroup_every` steps ("dynamic" grouping) or never (0: fixed at the start).
QAT here fine-tunes a trained full-precision model, the usual practice and much
cheaper than training quantized from scratch; through `train.loop.train` it gets the
progress bar, logs, checkpoints, resume and the non-finite guard of every run.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import data as data_lib
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.quant.config import QuantConfig
from moe_jax.quant.core import compute_groups, fake_quantize_params
from moe_jax.train import loop
from moe_jax.train.objective import Objective, lm_objective


@functools.lru_cache(maxsize=32)
def qat_transform(qcfg: QuantConfig | None, regroup_every: int = 0):
  """`lm_objective`'s transform: (params, extra, step) -> fake-quantized params, extra
  with the groups of this step, metrics. `step` None (evaluation): no regrouping.
  Cached: the same function for the same settings, so fine-tunes (and their resumes)
  with equal configs share one compiled step."""
  def transform(params, extra, step):
    if qcfg is None:
      return params, extra, {}
    groups, metrics = extra["groups"], {}
    if regroup_every and step is not None:
      regroup = (step > 0) & (step % regroup_every == 0)
      new = jax.lax.cond(regroup,
                         lambda: compute_groups(jax.lax.stop_gradient(params), qcfg),
                         lambda: groups)
      changed = sum(jnp.sum(new[k] != groups[k]) for k in new)
      total = sum(g.size for g in new.values())
      # Summed over a logging window (the loop sums "_count" metrics), so
      # regrouped_pct_count / regroup_count is the mean share per regrouping.
      metrics = {"regroup_count": regroup.astype(jnp.float32),
                 "regrouped_pct_count": jnp.where(regroup, 100.0 * changed / total, 0.0)}
      groups, extra = new, {**extra, "groups": new}
    return fake_quantize_params(params, qcfg, groups), extra, metrics
  return transform


def qat_objective(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int, qcfg: QuantConfig | None,
                  *, params, router_bias=None, regroup_every: int = 0) -> Objective:
  """The language-model objective on fake-quantized weights (qcfg None: the plain
  objective, a full-precision control with the same steps), from `params`."""
  base = lm_objective(mcfg, tcfg, seq_len, params=params, router_bias=router_bias,
                      transform=qat_transform(qcfg, regroup_every), name="qat",
                      config={"quant": dataclasses.asdict(qcfg) if qcfg else None,
                              "regroup_every": regroup_every})

  def init(rng):
    p, extra = base.init(rng)
    groups = compute_groups(nn.meta.unbox(p), qcfg) if qcfg else {}
    return p, {**extra, "groups": groups}

  return dataclasses.replace(base, init=init)


def finetune(params, router_bias, mcfg: ModelConfig, dcfg: data_lib.DataConfig,
             tcfg: TrainConfig, qcfg: QuantConfig | None, *, workdir: str | os.PathLike,
             regroup_every: int = 0, corpus=None, progress: bool = False,
             desc: str = "qat", **train_kw):
  """Fine-tune `params` for tcfg.steps with fake quantization in `workdir` (resumes
  there). Returns (params, router_bias, groups at the end, RunResult). History rows
  carry `regroup_count` / `regrouped_pct_count` (see qat_transform)."""
  objective = qat_objective(mcfg, tcfg, dcfg.seq_len, qcfg, params=params,
                            router_bias=router_bias, regroup_every=regroup_every)
  result = loop.train(mcfg, dcfg, tcfg, workdir, objective=objective, corpus=corpus,
                      progress=progress, desc=desc, **train_kw)
  state = result.state
  return state.params, state.router_bias, state.extra["groups"], result
