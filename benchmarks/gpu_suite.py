"""Every benchmark in one go on an accelerator, into one JSON file.

    python benchmarks/gpu_suite.py --out gpu_suite.json        # one H200: ~5-7 min
    python benchmarks/gpu_suite.py --cpu-smoke --out /tmp/s.json   # shrunk, CPU, ~1 min

    moe_layer      MoE block fwd+bwd per dispatch (tiled, ragged_dot, capacity, dense
                   reference) vs the dense limit, cost growth 8 -> 128 experts
    train_mfu      full train step of a ~1B-parameter MoE in bfloat16: tokens/s and
                   MFU against the datasheet peak and a measured large matmul
    quant          quantized inference (dequant / integer) vs bf16/fp32
    remat_memory   peak step memory per remat policy (compiled memory analysis)
    serving        experiments.serving.benchmark(smoke=...) when that module exists

Each section runs in its own try block: a failure is recorded with its error and the
rest still run. Section times are in the JSON (`seconds`).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import moe_layer, quant_inference, remat_memory, train_throughput  # noqa: E402
from moe_jax.config import ModelConfig, get_config  # noqa: E402
from moe_jax.models.counting import count_params  # noqa: E402

H200_BF16_PEAK = 989e12   # dense bf16 FLOP/s, NVIDIA H200 SXM datasheet (no sparsity)


def one_billion(smoke: bool) -> ModelConfig:
  """~1.1B total / ~0.3B active parameters: 12 layers of 16 experts (top-2, width 1024)
  at d_model 1536, 32k vocabulary, bfloat16."""
  if smoke:
    return get_config("tiny", dtype="bfloat16")
  return ModelConfig(vocab_size=32768, d_model=1536, n_layers=12, n_heads=12, n_kv_heads=12,
                     max_seq_len=2048, n_dense_layers=0, n_experts=16, d_expert=1024,
                     top_k=2, n_groups=1, topk_groups=1, tie_embeddings=False,
                     dtype="bfloat16", dropless_block=256)


def train_mfu(smoke: bool) -> dict:
  mcfg = one_billion(smoke)
  seq, batch, steps = (32, 2, 1) if smoke else (2048, 16, 10)
  mcfg = mcfg.replace(max_seq_len=seq)
  counts = count_params(mcfg)
  peak = train_throughput.matmul_peak(n=256 if smoke else 8192, dtype=jnp.bfloat16)
  flops = train_throughput.model_flops_per_token(mcfg, seq)
  out = {"params_total": counts.total, "params_active": counts.active, "seq": seq,
         "batch": batch, "matmul_peak_tflops": peak / 1e12,
         "model_gflops_per_token": flops / 1e9}
  for dispatch, impl in [("dropless", "tiled"), ("dropless", "ragged")]:
    r = train_throughput.measure(mcfg.replace(dispatch=dispatch, dropless_impl=impl),
                                 seq, batch, steps)
    r["mfu_vs_measured_matmul"] = r["tokens_per_s"] * flops / peak
    r["mfu_vs_h200_datasheet"] = r["tokens_per_s"] * flops / H200_BF16_PEAK
    out[f"{dispatch}-{impl}"] = r
  return out


def serving(smoke: bool) -> dict:
  """The hook for the serving benchmark: `experiments.serving.benchmark(smoke=bool)`
  returning a JSON-able dict, once that module exists."""
  try:
    module = importlib.import_module("experiments.serving")
  except ImportError as e:
    return {"skipped": f"experiments.serving not importable: {e}"}
  if not hasattr(module, "benchmark"):
    return {"skipped": "experiments.serving has no benchmark(smoke=...) function"}
  return module.benchmark(smoke=smoke)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="gpu_suite.json")
  p.add_argument("--cpu-smoke", action="store_true", help="shrunk shapes, runs on a CPU")
  p.add_argument("--only", nargs="*", help="section names to run (default: all)")
  args = p.parse_args(argv)
  smoke = args.cpu_smoke
  sections = {
      "moe_layer": lambda: moe_layer.run(
          tokens=256 if smoke else 16384, rounds=1 if smoke else 5, quick=smoke,
          ragged=True, scaling=False, growth=not smoke,
          dtype="float32" if smoke else "bfloat16"),
      "train_mfu": lambda: train_mfu(smoke),
      "quant": lambda: quant_inference.main(
          ["--preset", "tiny", "--batch", "1", "--seq", "8", "--rounds", "1"] if smoke else
          ["--preset", "small", "--batch", "32", "--seq", "256"]),
      "remat_memory": lambda: remat_memory.run(*(("tiny", 32, 2) if smoke else
                                                 ("small", 256, 32))),
      "serving": lambda: serving(smoke),
  }
  out = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
         "smoke": smoke, "jax": jax.__version__}
  start = time.perf_counter()
  for name, fn in sections.items():
    if args.only and name not in args.only:
      continue
    t = time.perf_counter()
    try:
      out[name] = fn()
    except Exception as e:  # noqa: BLE001 -- one failing section must not lose the rest
      out[name] = {"error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=5)}
    out[name]["seconds"] = time.perf_counter() - t
    with open(args.out, "w") as f:                  # written after every section
      json.dump(out, f, indent=1)
  out["seconds"] = time.perf_counter() - start
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps({k: v.get("seconds", v) if isinstance(v, dict) else v
                    for k, v in out.items()}, indent=1))
  return out


if __name__ == "__main__":
  main()
