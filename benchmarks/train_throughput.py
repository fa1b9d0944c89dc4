"""Training throughput and model FLOPs utilisation (MFU) of the full train step.

    python benchmarks/train_throughput.py                  # small preset, each dispatch
    python benchmarks/train_throughput.py --preset tiny --steps 5

MFU = model FLOPs per second / peak, where the peak is the dense matmul rate this
process measures on the same device just before (so the ratio is side by side, not
against a datasheet). Model FLOPs per token = 6 * (active parameters without the
embedding lookup) + 12 * layers * seq_len * d_attn (causal attention scores and
values, forward + backward, counted for the full square as PaLM does).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from moe_jax.config import TrainConfig, get_config
from moe_jax.models.counting import count_params
from moe_jax.train.step import init_state, jit_steps


def matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 10) -> float:
  """Dense matmul FLOP/s of this device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def model_flops_per_token(mcfg, seq_len: int) -> float:
  counts = count_params(mcfg)
  # The input embedding is a lookup (no FLOPs); a tied output head still multiplies.
  lookup = mcfg.vocab_size * mcfg.d_model if not mcfg.tie_embeddings else 0
  dense = 6 * (counts.active - lookup)
  attention = 12 * mcfg.n_layers * seq_len * mcfg.n_heads * mcfg.resolved_head_dim
  return dense + attention


def measure(mcfg, seq_len: int, batch: int, steps: int) -> dict:
  tcfg = TrainConfig(steps=steps + 1, warmup_steps=1)
  state = init_state(mcfg, tcfg, seq_len)
  train, _ = jit_steps(mcfg, tcfg)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, 256)
  b = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  t = time.perf_counter()
  state, m = train(state, b)
  m["loss"].block_until_ready()
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(steps):
    state, m = train(state, b)
  m["loss"].block_until_ready()
  step_s = (time.perf_counter() - t) / steps
  return {"step_ms": 1e3 * step_s, "tokens_per_s": batch * seq_len / step_s,
          "compile_s": compile_s}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dispatch", nargs="*", default=["dropless", "capacity", "dense"])
  p.add_argument("--dtype", default="float32")
  args = p.parse_args()
  peak = matmul_peak(dtype=jnp.dtype(args.dtype))
  out = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
         "preset": args.preset, "seq_len": args.seq_len, "batch": args.batch,
         "matmul_peak_gflops": peak / 1e9, "runs": []}
  for dispatch in args.dispatch:
    mcfg = get_config(args.preset, dispatch=dispatch, max_seq_len=args.seq_len,
                      dtype=args.dtype)
    flops = model_flops_per_token(mcfg, args.seq_len)
    r = measure(mcfg, args.seq_len, args.batch, args.steps)
    r.update(dispatch=dispatch, model_gflops_per_token=flops / 1e9,
             mfu=r["tokens_per_s"] * flops / peak)
    out["runs"].append(r)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
