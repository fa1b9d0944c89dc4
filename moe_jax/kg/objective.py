"""The language-model objective on fused batches, and the cloze metrics.

    batch = {inputs (B, T), targets (B, T), mask (B, T)}  [+ the kg arrays of
            moe_jax.kg.fusion.KG_KEYS when config.kg_fusion]
    kg_lm_objective = lm_objective (moe_jax.train.objective) + those batch keys

There is no second loss: `moe_jax.train.objective.loss_fn` reads the padding mask
and the kg arrays when a batch has them, so the fused LM trains through the one
loop (`moe_jax.train.loop.train(..., objective=kg_lm_objective(...),
train_iter=moe_jax.kg.batching.FactBatches(...))`), with its checkpoints, exact
resume, logs and held-out evaluation; with kg_fusion off it is the plain LM.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.kg.fusion import KG_KEYS, kg_inputs
from moe_jax.models.transformer import Transformer
from moe_jax.train.objective import Objective, lm_objective, variables_of


def batch_keys(mcfg: ModelConfig) -> tuple[str, ...]:
  """What a step of the fused LM reads from a batch."""
  return ("inputs", "targets", "mask") + (KG_KEYS if mcfg.kg_fusion else ())


def kg_lm_objective(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int, *,
                    config: Mapping[str, Any] | None = None) -> Objective:
  """Next-token prediction on padded rows with (when mcfg.kg_fusion) kg inputs.
  `config`: the data's identity (graph fingerprint, fact split, graph kind), stored
  in every checkpoint so a resume on other data is refused."""
  return dataclasses.replace(
      lm_objective(mcfg, tcfg, seq_len, name="kg_lm", config=config),
      batch_keys=batch_keys(mcfg))


def token_scores(params, extra, batch, mcfg: ModelConfig):
  """Per-token NLL and argmax correctness, each (B, T) float32."""
  logits, _ = Transformer(mcfg).apply(variables_of(params, extra), batch["inputs"],
                                      kg=kg_inputs(batch, mcfg))            # (B, T, V)
  logp = jax.nn.log_softmax(logits, -1)                                     # (B, T, V)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]  # (B, T)
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return nll, correct


def cloze_metrics(nll: np.ndarray, correct: np.ndarray, answer_mask: np.ndarray,
                  lm_mask: np.ndarray) -> dict[str, np.ndarray]:
  """Per example: exact match (every answer token is the argmax given the true
  prefix, which is exactly greedy decoding producing the answer), answer-token
  accuracy, the answer's summed NLL, and the summed NLL / token count of the whole
  sentence."""
  a = answer_mask.astype(np.float32)
  n_ans = np.maximum(a.sum(1), 1.0)
  return {"exact": (((correct * a).sum(1)) == a.sum(1)).astype(np.float32),
          "token_acc": (correct * a).sum(1) / n_ans,
          "answer_nll": (nll * a).sum(1),
          "nll_sum": (nll * lm_mask).sum(1), "tokens": lm_mask.sum(1).astype(np.float32)}
