"""SL-CAI: critique and revise sampled responses against the constitution, then
fine-tune on the revisions (Bai et al., 2022, "Constitutional AI", section 3).

    prompts --(caller samples the base model)--> responses
      for each: pick a violated principle (the red-team target first, else random)
                critique(...)  "Principle 4 (no_insults): ... it uses the blocked word(s) ['fool']"
                revise(...)    the judge kind's scripted reviser; repeat `rounds` times
    build_revisions(...) -> [(prompt, revision)]
    slcai_batches(pairs, batch, seq_len, seed) -> {"inputs", "targets"} for loop.train

At this scale the critic and reviser are scripts (judges.py), not the model: one
reviser per judge kind (drop blocked words, mask e-mails and phone numbers, collapse
runs, sentence-case shouting, refuse a harmful prompt, trim to the last full
sentence, ...). `revise` never returns a text that scores lower than the original
under its principle: a reviser whose result would score lower is not applied.

Fine-tuning is the plain LM objective on the shared layout (batching.py) with the
prompt's targets set to -1 (losses.cross_entropy skips negative targets), so the
model learns the revision given the prompt, not the prompt; the EOS after the
revision is a target, so it also learns where to stop.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from moe_jax.align.batching import IGNORE, ShuffledBatches, encode_sequences
from moe_jax.align.constitution import (PASS_THRESHOLD, Principle, judge_scores,
                                        principle_by_id)
from moe_jax.align.judges import KINDS


def _text(prompt) -> str:
  return getattr(prompt, "text", prompt)


def critique(principles: Sequence[Principle], prompt, response: str,
             principle_id: int) -> str:
  """What the principle's judge finds in `response`, in one line."""
  p = principle_by_id(principles, principle_id)
  score = p.score(_text(prompt), response)
  verdict = "holds" if score >= PASS_THRESHOLD else "is violated"
  detail = KINDS[p.judge].explain(_text(prompt), response, p.params)
  return f"Principle {p.id} ({p.name}) {verdict}, score {score:.2f}: {detail}. ({p.text})"


def revise(principles: Sequence[Principle], prompt, response: str,
           principle_id: int) -> str:
  """`response` revised by the scripted reviser of the principle's judge kind; never
  scores lower than `response` under that principle."""
  p = principle_by_id(principles, principle_id)
  revised = KINDS[p.judge].revise(_text(prompt), response, p.params)
  if p.score(_text(prompt), revised) < p.score(_text(prompt), response):
    return response
  return revised


def revise_sampled(principles: Sequence[Principle], prompt, response: str,
                   rng: np.random.Generator, rounds: int = 3) -> tuple[str, list[int]]:
  """Up to `rounds` critique-revision steps, each against one violated principle: the
  prompt's red-team target when it is violated, else one drawn at random. Returns
  the revision and the ids revised against (empty when nothing was violated)."""
  text, used = response, []
  target = getattr(prompt, "principle", None)
  for _ in range(rounds):
    scores = judge_scores(principles, _text(prompt), text)
    failing = [p.id for p, s in zip(principles, scores) if s < PASS_THRESHOLD]
    failing = [i for i in failing if i not in used]     # a reviser that could not
    if not failing:                                     # help will not help again
      break
    pid = target if target in failing else int(rng.choice(failing))
    text = revise(principles, prompt, text, pid)
    used.append(pid)
  return text, used


def build_revisions(principles: Sequence[Principle], prompts: Sequence,
                    responses: Sequence[str], seed: int = 0, rounds: int = 3
                    ) -> list[tuple]:
  """[(prompt, revision)] for sampled `responses` to `prompts` (same order; a
  response that violates nothing is its own revision). Deterministic in `seed`."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  return [(prompt, revise_sampled(principles, prompt, response,
                                  np.random.default_rng([seed, i]), rounds)[0])
          for i, (prompt, response) in enumerate(zip(prompts, responses))]


def lm_rows(pairs: Sequence[tuple], seq_len: int, prompt_len: int = 32
            ) -> dict[str, np.ndarray]:
  """{"inputs", "targets"} (N, seq_len) int32 of prompt + revision + EOS in the shared
  layout; targets are IGNORE (-1) on the prompt and the padding."""
  tokens, mask = encode_sequences([p for p, _ in pairs], [r for _, r in pairs],
                                  prompt_len, seq_len + 1, eos=True)
  targets = np.where(mask[:, 1:], tokens[:, 1:], IGNORE)
  targets[:, :prompt_len - 1] = IGNORE              # predicting the prompt's own bytes
  return {"inputs": tokens[:, :-1], "targets": targets.astype(np.int32)}


def slcai_batches(pairs: Sequence[tuple], batch: int, seq_len: int, seed: int = 0,
                  prompt_len: int = 32) -> ShuffledBatches:
  """An infinite, resumable iterator of LM batches {"inputs", "targets"} (batch,
  seq_len) over the (prompt, revision) pairs, reshuffled every epoch: the
  `train_iter` of `moe_jax.train.loop.train` with the default LM objective."""
  rows = lm_rows(pairs, seq_len, prompt_len)
  return ShuffledBatches(len(pairs), batch, seed,
                         lambda idx: {k: v[idx] for k, v in rows.items()})
