"""Inference throughput from quantized weights vs full precision, side by side.

    python benchmarks/quant_inference.py                          # small preset, CPU
    python benchmarks/quant_inference.py --preset small --batch 32 --seq 256   # on a GPU

Random-init model (speed does not depend on the trained values): fp32 forward, and for
uniform int8, uniform int4 and the mixed 8/4 scheme the dequantize-on-the-fly forward
and the integer forward (int8 activations, int8 x int8 -> int32 dot_general), timed in
interleaved rounds. Prints one JSON object: tokens/s and the ratio to fp32. On a CPU
expect ratios below 1 (no fast low-bit kernels); the source's 2.8x is a GPU claim.
"""
from __future__ import annotations

import argparse
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import get_config
from moe_jax.models.transformer import Transformer
from moe_jax.quant import QuantConfig, inference, storage

SCHEMES = {"int8": QuantConfig(scheme="all_high"), "int4": QuantConfig(scheme="all_low"),
           "mixed": QuantConfig()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  mcfg = get_config(args.preset, max_seq_len=max(args.seq, 8))
  tokens = jnp.zeros((args.batch, args.seq), jnp.int32)
  params = nn.meta.unbox(Transformer(mcfg).init(jax.random.PRNGKey(0), tokens[:1]))["params"]
  fp = jax.jit(lambda p, t: Transformer(mcfg).apply({"params": p}, t)[0])
  dequant = jax.jit(lambda q, t: Transformer(mcfg).apply(
      {"params": storage.dequantize_params(q)}, t)[0])
  integer = jax.jit(lambda q, t: inference.forward(q, t, mcfg))
  fns = {"fp32": functools.partial(fp, params)}
  for name, qcfg in SCHEMES.items():
    qparams = storage.quantize_params(params, qcfg)
    fns[f"{name} dequant"] = functools.partial(dequant, qparams)
    fns[f"{name} integer"] = functools.partial(integer, qparams)
  speed = inference.compare_throughput(fns, tokens, rounds=args.rounds)
  result = {"device": str(jax.devices()[0]), "preset": args.preset,
            "tokens": [args.batch, args.seq], "tokens_per_s": speed,
            "ratio_vs_fp32": {k: v / speed["fp32"] for k, v in speed.items()}}
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
