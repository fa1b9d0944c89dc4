"""Preference pairs labelled by the judges, and a Bradley-Terry reward model on the
LM trunk with one head per principle.

    (prompt, a, b) --judges under a sampled principle i--> label = sigmoid((s_a - s_b) / tau)
    tokens (B, T) --Transformer trunk (from the LM's params)--> features (B, T, D)
       --read at the last masked-in position--> h (B, D) --Dense(P)--> scores (B, P)
    loss = BCE(sigmoid(r_i(chosen) - r_i(rejected)), label) + balance/z terms
    reward = mean over principles of the scores (the scalar PPO optimises)

Bradley & Terry (1952) model P(a > b) = sigmoid(r(a) - r(b)); the reward models of
Ouyang et al. (2022) and Bai et al. (2022) train it with the hard label 1. Here the
judges give graded scores, so the label is soft (a bigger judge gap, a surer
label), and each pair trains only the head of the principle it was labelled under,
which keeps the per-principle scores apart: the experiment can then show which
principle the policy learns to game.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import losses
from moe_jax.align.batching import ShuffledBatches, encode_sequences
from moe_jax.align.constitution import Principle, judge_scores, principle_by_id
from moe_jax.align.slcai import revise_sampled
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.models.transformer import Transformer
from moe_jax.train.objective import Objective, model_init, step_config

PAIR_KEYS = ("chosen", "rejected", "chosen_mask", "rejected_mask", "principle", "label")
DEFAULT_TAU = 0.1


# ---------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pair:
  """Two responses to one prompt; `label` = P(a preferred to b) under `principle`."""
  prompt: str
  a: str
  b: str
  principle: int                # id (1-based); the reward head is principle - 1
  label: float
  score_a: float
  score_b: float

  def swapped(self) -> "Pair":
    return Pair(self.prompt, self.b, self.a, self.principle, 1.0 - self.label,
                self.score_b, self.score_a)


def soft_label(score_a: float, score_b: float, tau: float = DEFAULT_TAU) -> float:
  """sigmoid((score_a - score_b) / tau), in (0, 1); label(a, b) = 1 - label(b, a)."""
  return float(1.0 / (1.0 + np.exp(-(np.float64(score_a) - score_b) / tau)))


def _pair(principles, prompt, a, b, rng, tau, keep_ties) -> Pair | None:
  text = getattr(prompt, "text", prompt)
  sa, sb = judge_scores(principles, text, a), judge_scores(principles, text, b)
  differ = [i for i in range(len(principles)) if sa[i] != sb[i]]
  target = getattr(prompt, "principle", None)
  if differ:
    ids = [principles[i].id for i in differ]
    pid = target if target in ids else int(rng.choice(ids))
  elif keep_ties:
    pid = int(rng.choice([p.id for p in principles]))
  else:
    return None
  i = [p.id for p in principles].index(pid)
  return Pair(text, a, b, pid, soft_label(sa[i], sb[i], tau), float(sa[i]), float(sb[i]))


def preference_pairs(principles: Sequence[Principle], prompts: Sequence,
                     responses_a: Sequence[str], responses_b: Sequence[str], seed: int = 0,
                     tau: float = DEFAULT_TAU, keep_ties: bool = False) -> list[Pair]:
  """One pair per prompt, labelled under a sampled principle: among the principles
  whose judges tell a and b apart (the prompt's red-team target first), one at
  random. Pairs no judge tells apart are dropped (kept with label 0.5 under a
  random principle when `keep_ties`)."""
  if not len(prompts) == len(responses_a) == len(responses_b):
    raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} responses_a, "
                     f"{len(responses_b)} responses_b: need one of each per prompt")
  out = []
  for i, (prompt, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
    pair = _pair(principles, prompt, a, b, np.random.default_rng([seed, i]), tau, keep_ties)
    if pair is not None:
      out.append(pair)
  return out


def revision_pairs(principles: Sequence[Principle], prompts: Sequence,
                   responses: Sequence[str], seed: int = 0, tau: float = DEFAULT_TAU,
                   rounds: int = 1) -> list[Pair]:
  """Original vs its SL-CAI revision, labelled under the principle revised against
  (in random order): informative pairs that differ in exactly what a principle
  asks for. Responses that violate nothing, or whose revision scores the same,
  give no pair."""
  out = []
  for i, (prompt, response) in enumerate(zip(prompts, responses)):
    rng = np.random.default_rng([seed, i])
    revised, used = revise_sampled(principles, prompt, response, rng, rounds)
    if not used:
      continue
    text = getattr(prompt, "text", prompt)
    p = principle_by_id(principles, used[0])
    s_orig, s_rev = p.score(text, response), p.score(text, revised)
    if s_orig == s_rev:
      continue
    pair = Pair(text, revised, response, p.id, soft_label(s_rev, s_orig, tau), s_rev, s_orig)
    out.append(pair.swapped() if rng.random() < 0.5 else pair)
  return out


def pair_arrays(pairs: Sequence[Pair], length: int, prompt_len: int = 32
                ) -> dict[str, np.ndarray]:
  """The reward batch of `pairs`, each oriented so that "chosen" is the response the
  judge prefers (label = P(chosen > rejected) >= 0.5): chosen, rejected (N, length)
  int32, their masks (N, length) bool, principle (N,) int32 head index, label (N,)."""
  pairs = [p if p.label >= 0.5 else p.swapped() for p in pairs]
  prompts = [p.prompt for p in pairs]
  chosen, chosen_mask = encode_sequences(prompts, [p.a for p in pairs], prompt_len, length)
  rejected, rejected_mask = encode_sequences(prompts, [p.b for p in pairs], prompt_len, length)
  return {"chosen": chosen, "rejected": rejected, "chosen_mask": chosen_mask,
          "rejected_mask": rejected_mask,
          "principle": np.array([p.principle - 1 for p in pairs], np.int32),
          "label": np.array([p.label for p in pairs], np.float32)}


def pair_iterator(pairs: Sequence[Pair], batch: int, length: int, seed: int = 0,
                  prompt_len: int = 32) -> ShuffledBatches:
  """An infinite, resumable iterator of reward batches (PAIR_KEYS) over `pairs`,
  reshuffled every epoch: the `train_iter` of loop.train with reward_objective."""
  arrays = pair_arrays(pairs, length, prompt_len)
  return ShuffledBatches(len(pairs), batch, seed,
                         lambda idx: {k: v[idx] for k, v in arrays.items()})


# ---------------------------------------------------------------------------------
# The reward model
# ---------------------------------------------------------------------------------

def _forward(rm_params, tokens, mask, mcfg: ModelConfig):
  variables = {"params": rm_params["trunk"]}
  if rm_params.get("router_bias"):
    variables["router_bias"] = rm_params["router_bias"]
  _, aux = Transformer(mcfg).apply(variables, tokens, return_features=True)
  features = aux.pop("features")                                        # (B, T, D)
  mask = mask.astype(bool)
  last = tokens.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)        # (B,)
  h = jnp.take_along_axis(features, last[:, None, None], axis=1)[:, 0]  # (B, D)
  head = rm_params["head"]
  scores = h.astype(jnp.float32) @ head["kernel"] + head["bias"]        # (B, P)
  return scores, aux


def reward_scores(rm_params, tokens: jax.Array, mask: jax.Array, mcfg: ModelConfig
                  ) -> jax.Array:
  """(B, P) float32 per-principle rewards of token rows in the shared layout
  (batching.py). Pure and jittable (mcfg static); the score is read at each row's
  LAST masked-in position (the end of the response; a row with no True reads the
  last column). `rm_params`: {"trunk", "head"[, "router_bias"]} (reward_params).
  The scalar reward is the mean over principles."""
  return _forward(rm_params, tokens, mask, mcfg)[0]


def reward_params(params, extra=None) -> dict[str, Any]:
  """rm_params for reward_scores from a trained state's (params, extra)."""
  out = {"trunk": params["trunk"], "head": params["head"]}
  if extra and extra.get("router_bias"):
    out["router_bias"] = extra["router_bias"]
  return out


def bradley_terry_loss(margin: jax.Array, label: jax.Array) -> jax.Array:
  """Mean BCE of sigmoid(margin) against soft labels: label * -log sigmoid(m) +
  (1 - label) * -log sigmoid(-m). margin, label: (B,)."""
  return jnp.mean(label * jax.nn.softplus(-margin) + (1.0 - label) * jax.nn.softplus(margin))


@functools.lru_cache(maxsize=32)
def _reward_loss(mcfg: ModelConfig, tcfg: TrainConfig):
  """One loss function per (configs), so the compiled step is reused across runs."""
  def loss(params, extra, batch, frozen, rng, step):
    del frozen, rng, step
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])               # (2B, T)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    scores, aux = _forward(reward_params(params, extra), tokens, mask, mcfg)   # (2B, P)
    picked = jnp.take_along_axis(
        scores, jnp.tile(batch["principle"], 2)[:, None], axis=1)[:, 0]       # (2B,)
    chosen, rejected = jnp.split(picked, 2)
    margin = chosen - rejected                                                 # (B,)
    label = batch["label"].astype(jnp.float32)
    bt = bradley_terry_loss(margin, label)
    balance = losses.balance_loss(aux, tcfg.balance_loss, tcfg.balance_alpha)
    z = losses.router_z_loss(aux["router_z"], tcfg.z_loss_alpha) if aux else 0.0
    accuracy = jnp.mean(((margin > 0) == (label > 0.5)).astype(jnp.float32))
    metrics = dict(bt_loss=bt, pair_accuracy=accuracy, margin=jnp.mean(margin),
                   balance=balance, z_loss=z)
    if aux:
      metrics["load"] = aux["load"]
    return bt + balance + z, (metrics, extra)
  return loss


def reward_objective(mcfg: ModelConfig, tcfg: TrainConfig, seq_len: int, init_params,
                     n_principles: int, *, router_bias=None, head_scale: float = 0.02
                     ) -> Objective:
  """The reward model as an Objective for moe_jax.train.loop.train (train_iter =
  pair_iterator(...)): params {"trunk": the LM's params (copied), "head": Dense(P)};
  the router bias (if the model has one) rides in `extra`, not updated. The head
  starts at N(0, head_scale^2) weights, zero bias."""
  def init(rng):
    variables = model_init(mcfg, seq_len, rng, init_params)
    bias = variables.get("router_bias", {})
    if router_bias is not None and bias:
      bias = jax.tree.map(jnp.asarray, router_bias)
    kernel = head_scale * jax.random.normal(jax.random.fold_in(rng, 1),
                                            (mcfg.d_model, n_principles), jnp.float32)
    head = {"kernel": kernel, "bias": jnp.zeros((n_principles,), jnp.float32)}
    return ({"trunk": variables["params"], "head": head},
            {"router_bias": nn.meta.unbox(bias)})

  return Objective(name="reward", init=init, loss=_reward_loss(mcfg, step_config(tcfg)),
                   evaluate=None, batch_keys=PAIR_KEYS,
                   config={"n_principles": n_principles, "seq_len": seq_len})


@functools.partial(jax.jit, static_argnames="mcfg")
def _scores_jit(rm_params, tokens, mask, mcfg):
  return reward_scores(rm_params, tokens, mask, mcfg)


def score_texts(rm_params, prompts: Sequence, responses: Sequence[str], mcfg: ModelConfig,
                length: int, prompt_len: int = 32, batch: int = 32) -> np.ndarray:
  """(N, P) reward-model scores of (prompt, response) texts, in fixed-size batches
  (one compilation; the last batch is padded)."""
  tokens, mask = encode_sequences(prompts, responses, prompt_len, length)
  out = []
  for start in range(0, len(tokens), batch):
    t, m = tokens[start:start + batch], mask[start:start + batch]
    pad = batch - len(t)
    t = np.concatenate([t, np.repeat(t[:1], pad, 0)])
    m = np.concatenate([m, np.repeat(m[:1], pad, 0)])
    out.append(np.asarray(_scores_jit(rm_params, t, m, mcfg))[:batch - pad])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def pair_accuracy(rm_params, pairs: Sequence[Pair], mcfg: ModelConfig, length: int,
                  prompt_len: int = 32, batch: int = 32) -> float:
  """Share of pairs where the reward model's head for the pair's principle orders
  a and b as the judge does (hard label: the sign of score_a - score_b; judge ties
  dropped). NaN when no pair is left."""
  pairs = [p for p in pairs if p.score_a != p.score_b]
  if not pairs:
    return float("nan")
  prompts = [p.prompt for p in pairs]
  ra = score_texts(rm_params, prompts, [p.a for p in pairs], mcfg, length, prompt_len, batch)
  rb = score_texts(rm_params, prompts, [p.b for p in pairs], mcfg, length, prompt_len, batch)
  head = np.array([p.principle - 1 for p in pairs])
  rows = np.arange(len(pairs))
  model = ra[rows, head] - rb[rows, head]
  judge = np.array([p.score_a - p.score_b for p in pairs])
  return float(np.mean(np.sign(model) == np.sign(judge)))
