"""Training objective and evaluation of the LM with knowledge-graph inputs.

    batch = {inputs (B, T), targets (B, T), mask (B, T)}  [+ the kg arrays of
            moe_jax.kg.fusion.KG_KEYS when config.kg_fusion]

`kg_loss_fn` has the signature of `moe_jax.train.step.loss_fn`, so it plugs into
`train_step(..., objective=kg_loss_fn)` (the same hook QAT uses); with
kg_fusion off it computes exactly loss_fn's objective (plus the padding mask).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import losses
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.kg.fusion import KG_KEYS
from moe_jax.models.transformer import Transformer
from moe_jax.train.objective import Objective


def kg_inputs(batch, mcfg: ModelConfig):
  """The kg dict of a batch, or None when fusion is off."""
  return {k: batch[k] for k in KG_KEYS} if mcfg.kg_fusion else None


def init_params(mcfg: ModelConfig, seed: int, example_batch):
  """Parameters of the model with fusion (the kg submodule is only created when
  called with kg inputs, so init needs an example batch of them)."""
  batch = {k: jnp.asarray(v[:1]) for k, v in example_batch.items()}
  variables = Transformer(mcfg).init(jax.random.PRNGKey(seed), batch["inputs"],
                                     kg=kg_inputs(batch, mcfg))
  return nn.meta.unbox(variables)["params"]


def _variables(params, router_bias):
  variables = {"params": params}
  if router_bias:
    variables["router_bias"] = router_bias
  return variables


def kg_loss_fn(params, router_bias, batch, mcfg: ModelConfig, tcfg: TrainConfig):
  logits, aux = Transformer(mcfg).apply(_variables(params, router_bias), batch["inputs"],
                                        kg=kg_inputs(batch, mcfg))
  ce, acc = losses.cross_entropy(logits, batch["targets"], batch.get("mask"))
  balance = losses.balance_loss(aux, tcfg.balance_loss, tcfg.balance_alpha)
  z = losses.router_z_loss(aux["router_z"], tcfg.z_loss_alpha) if aux else 0.0
  return ce + balance + z, dict(ce=ce, accuracy=acc, balance=balance, z_loss=z, aux=aux)


def kg_lm_objective(mcfg: ModelConfig, tcfg: TrainConfig, params) -> Objective:
  """The fused LM as an `Objective` of the one train step (moe_jax.train): starts
  from `params` (init_params), trains them on kg_loss_fn. The router bias, when the
  model has one, starts at zero and is not updated here."""
  def init(rng):
    del rng
    return params, {"router_bias": {}}

  def loss(p, extra, batch, frozen, rng, step):
    del frozen, rng, step
    total, out = kg_loss_fn(p, extra["router_bias"], batch, mcfg, tcfg)
    out.pop("aux")
    return total, (out, extra)

  return Objective(name="kg_lm", init=init, loss=loss)


def token_scores(params, router_bias, batch, mcfg: ModelConfig):
  """Per-token NLL and argmax correctness, each (B, T) float32."""
  logits, _ = Transformer(mcfg).apply(_variables(params, router_bias), batch["inputs"],
                                      kg=kg_inputs(batch, mcfg))
  logp = jax.nn.log_softmax(logits, -1)                                     # (B, T, V)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]  # (B, T)
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return nll, correct


def cloze_metrics(nll: np.ndarray, correct: np.ndarray, answer_mask: np.ndarray,
                  lm_mask: np.ndarray) -> dict[str, np.ndarray]:
  """Per example: exact match (every answer token is the argmax given the true
  prefix, which is exactly greedy decoding producing the answer), answer-token
  accuracy, and the summed NLL / token count of the whole sentence."""
  a = answer_mask.astype(np.float32)
  n_ans = np.maximum(a.sum(1), 1.0)
  return {"exact": (((correct * a).sum(1)) == a.sum(1)).astype(np.float32),
          "token_acc": (correct * a).sum(1) / n_ans,
          "nll_sum": (nll * lm_mask).sum(1), "tokens": lm_mask.sum(1).astype(np.float32)}
