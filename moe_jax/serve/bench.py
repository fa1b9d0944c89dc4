"""Serving measurements: request traces, a real-time trace driver, latency metrics.

    held-out paragraphs ──> (prompt = first line, output = the rest)   lengths
    Poisson / gamma arrivals at rate λ                                  times
    run_trace: submit each request when the wall clock passes its arrival, step the
               scheduler; idle gaps (nothing queued or running) are skipped, not slept
    metrics:   TTFT, time per output token, end-to-end at P50/P90/P99, tokens/s,
               slot utilisation (useful / computed token slots), goodput under an SLO

Outputs have fixed lengths (EOS is not honoured), so every policy generates exactly
the same tokens and only the schedule differs.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models.transformer import Transformer
from moe_jax.serve.engine import Engine
from moe_jax.serve.sampling import SamplingConfig
from moe_jax.serve.scheduler import Request, Scheduler


def paragraph_lengths(docs, tokenizer, max_len: int) -> list[tuple[int, int]]:
  """(prompt, output) token lengths from documents: each paragraph's first line is a
  prompt and the rest its continuation, clipped so that both fit the context."""
  out = []
  for doc in docs:
    for para in doc.split("\n\n"):
      first, _, rest = para.strip().partition("\n")
      p, o = len(tokenizer.encode(first)), len(tokenizer.encode(rest))
      if p >= 2 and o >= 2:
        p = min(p, max_len // 2)
        out.append((p, min(o, max_len - p)))
  return out


def make_trace(lengths: list[tuple[int, int]], n: int, rate: float, *, seed: int = 0,
               arrival: str = "poisson", burstiness: float = 4.0,
               vocab: int = 256, max_output: int | None = None) -> list[Request]:
  """n requests with lengths drawn from `lengths`, arriving at `rate` per second:
  Poisson (exponential gaps) or gamma gaps with shape 1/burstiness (same mean rate,
  coefficient of variation sqrt(burstiness): bursts and lulls)."""
  rng = np.random.default_rng(seed)
  if arrival == "poisson":
    gaps = rng.exponential(1.0 / rate, n)
  elif arrival == "gamma":
    shape = 1.0 / burstiness
    gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
  else:
    raise ValueError(f"arrival={arrival!r}: allowed 'poisson', 'gamma'")
  picks = rng.integers(0, len(lengths), n)
  times = np.cumsum(gaps) - gaps[0]
  requests = []
  for i, (t, k) in enumerate(zip(times, picks)):
    p, o = lengths[k]
    o = min(o, max_output) if max_output else o
    requests.append(Request(prompt=[int(x) for x in rng.integers(0, vocab, p)],
                            max_new_tokens=o, arrival=float(t), id=i,
                            sampling=SamplingConfig(seed=i)))
  return requests


def run_trace(scheduler: Scheduler, requests: list[Request]) -> float:
  """Serve the trace in real time; returns the makespan in seconds (idle skipped).
  Sets each request's first_token_time / finish_time on the same clock as arrival."""
  pending = sorted(requests, key=lambda r: r.arrival)
  start, skipped = time.perf_counter(), 0.0

  def now():
    return time.perf_counter() - start + skipped
  scheduler.clock = now
  i = 0
  while i < len(pending) or not scheduler.idle:
    while i < len(pending) and pending[i].arrival <= now():
      scheduler.submit(pending[i])
      i += 1
    scheduler.draining = i == len(pending)
    busy = scheduler.active or (scheduler.queue and (
        scheduler.policy != "static" or scheduler.draining
        or len(scheduler.queue) >= scheduler.engine.batch))
    if not busy:                       # nothing can run before the next arrival
      skipped += max(0.0, pending[i].arrival - now())
      continue
    scheduler.step()
  return now()


def latency_metrics(requests: list[Request], makespan: float, stats: dict,
                    slo_s: float) -> dict[str, float]:
  ttft = np.array([r.first_token_time - r.arrival for r in requests])
  e2e = np.array([r.finish_time - r.arrival for r in requests])
  tpot = np.array([(r.finish_time - r.first_token_time) / (len(r.output) - 1)
                   for r in requests if len(r.output) > 1])
  tokens = np.array([len(r.output) for r in requests])
  row = {"tokens_per_s": float(tokens.sum() / makespan),
         "utilisation": stats["useful"] / stats["computed"]}
  for name, x, scale in (("ttft", ttft, 1e3), ("tpot", tpot, 1e3), ("e2e", e2e, 1e3)):
    for q in (50, 90, 99):
      row[f"{name}_p{q}_ms"] = float(np.percentile(x, q) * scale)
  row["goodput_tokens_per_s"] = float(tokens[e2e <= slo_s].sum() / makespan)
  row["slo_met"] = float(np.mean(e2e <= slo_s))
  return row


def warm_up(engine: Engine, params, max_rows: int) -> None:
  """Compile every prefill / insert / generate shape the schedulers can ask for."""
  state = engine.init_decode_state()
  rows = 1
  while rows <= max_rows:
    for bucket in engine.buckets:
      if bucket >= engine.max_len:
        continue
      prefix = engine.prefill(params, [[1]] * rows, [SamplingConfig()] * rows, bucket)
      state = engine.insert(prefix, state, [0])     # one compilation per prefix shape
    rows *= 2
  for kv_len in engine.buckets:
    state, tokens = engine.generate(params, state, kv_len)
  jax.block_until_ready(tokens)


def decode_vs_recompute(engine: Engine, params, context: int, rounds: int = 5
                        ) -> dict[str, float]:
  """Seconds per new token at `context` for a batch of engine.batch sequences: one
  KV-cache generate step vs the full forward over the context that decoding without
  a cache needs for every token (distill/generate.py before the engine). Timed in
  interleaved rounds; the best round counts."""
  model = Transformer(engine.config)
  tokens = jnp.ones((engine.batch, context), jnp.int32)
  variables = engine._variables(params)
  full = jax.jit(lambda v, t: model.apply(v, t)[0][:, -1])
  state = engine.init_decode_state()
  state = state.replace(positions=jnp.full((engine.batch,), context - 1, jnp.int32))
  jax.block_until_ready(full(variables, tokens))
  state, out = engine.generate(params, state, context)
  best = {"cached_s": float("inf"), "recompute_s": float("inf")}
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(5):
      state = state.replace(positions=jnp.full((engine.batch,), context - 1, jnp.int32))
      state, out = engine.generate(params, state, context)
    jax.block_until_ready(out)
    best["cached_s"] = min(best["cached_s"], (time.perf_counter() - t0) / 5)
    t0 = time.perf_counter()
    for _ in range(5):
      out2 = full(variables, tokens)
    jax.block_until_ready(out2)
    best["recompute_s"] = min(best["recompute_s"], (time.perf_counter() - t0) / 5)
  best["speedup"] = best["recompute_s"] / best["cached_s"]
  return best
