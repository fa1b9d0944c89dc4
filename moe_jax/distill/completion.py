"""Code-completion accuracy: greedy next-k-token completion at line starts.

    held-out code row:  ...prefix...\\n<indent>|c_0 c_1 ... c_{k-1}|...
                        `---- prompt (P tokens) ----'  reference (k tokens)
    model:              greedy_decode(prompt, k) -> g_0 ... g_{k-1}   (KV cache)
    exact@k   = mean over prompts of [g == c for all k tokens]
    prefix    = mean over prompts of (length of the longest common prefix of g, c) / k

The source reports code-completion quality for the distilled student without saying
how it is scored; ours is the simplest reading that a small byte-level model can
move: complete the first k tokens of a line of held-out code, after its indentation
(the prompt ends after the leading spaces/tabs, so the predictable indentation earns
no credit; blank lines are skipped). Decoding reuses the serving engine's
`greedy_decode` (one prefill, then one-token steps through a KV cache).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.serve.engine import greedy_decode


def completion_prompts(rows: np.ndarray, prompt_len: int, n_new: int,
                       max_prompts: int, newline: int = 10,
                       indent: tuple[int, ...] = (32, 9)) -> tuple[np.ndarray, np.ndarray]:
  """(prompts (N, prompt_len), references (N, n_new)) int32 from token rows (R, L):
  in each row, the first line whose content starts at a position c >= prompt_len
  with c + n_new <= L and is not blank; prompt = row[c - prompt_len : c], reference
  = row[c : c + n_new]. At most one prompt per row, the first `max_prompts` rows
  that have one."""
  prompts, refs = [], []
  for row in np.asarray(rows):
    i = 0
    while True:
      hits = np.flatnonzero(row[i:] == newline)
      if not len(hits):
        break
      c = i + int(hits[0]) + 1                      # the line's first token
      while c < len(row) and row[c] in indent:
        c += 1
      if c + n_new > len(row):
        break
      if c >= prompt_len and row[c] != newline:
        prompts.append(row[c - prompt_len:c])
        refs.append(row[c:c + n_new])
        break
      i = c
    if len(prompts) == max_prompts:
      break
  if not prompts:
    raise ValueError(f"no line start with {prompt_len} tokens before it and {n_new} "
                     f"after it in {len(rows)} rows of length {np.shape(rows)[-1]}")
  return np.stack(prompts).astype(np.int32), np.stack(refs).astype(np.int32)


def completion_scores(generated: np.ndarray, references: np.ndarray) -> dict[str, float]:
  """generated, references (N, k) -> {"exact": fraction of rows equal in all k
  tokens, "prefix": mean longest-common-prefix length / k}."""
  generated, references = np.asarray(generated), np.asarray(references)
  if generated.shape != references.shape:
    raise ValueError(f"generated {generated.shape} and references {references.shape} "
                     f"must have the same shape (N, k)")
  same = generated == references                                       # (N, k)
  prefix = np.cumprod(same, axis=1).sum(axis=1)                        # (N,)
  return {"exact": float(np.mean(same.all(axis=1))),
          "prefix": float(np.mean(prefix) / same.shape[1])}


def code_completion(variables, cfg: ModelConfig, prompts: np.ndarray,
                    references: np.ndarray, batch: int = 64) -> dict[str, float]:
  """The model's greedy completions of `prompts`, scored against `references`:
  whole batches of `batch` prompts (a remainder is dropped, so every call has one
  shape and one compiled decode per cfg)."""
  batch = min(batch, len(prompts))
  n, k = len(prompts) // batch * batch, references.shape[1]
  generated = np.concatenate([
      np.asarray(jax.device_get(greedy_decode(variables, jnp.asarray(prompts[i:i + batch]),
                                              cfg=cfg, n_new=k)))[:, -k:]
      for i in range(0, n, batch)])                                    # (n, k)
  return completion_scores(generated, references[:n])
