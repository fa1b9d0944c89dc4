"""Peak memory of one training step with and without rematerialisation.

    python benchmarks/remat_memory.py                     # small preset, batch 32 x 256
    python benchmarks/remat_memory.py --preset tiny --batch 4 --seq 32

From XLA's compiled memory analysis (`jit(...).lower(...).compile().memory_analysis()`),
so nothing runs: `temp_mb` is the scratch XLA allocates for the step (activations kept
for the backward pass and transients), `peak_mb` adds the arguments and outputs that
are not donated aliases. Prints one JSON object, one entry per `ModelConfig.remat`.
"""
from __future__ import annotations

import argparse
import json

import jax

from moe_jax.config import REMATS, TrainConfig, get_config
from moe_jax.train.objective import lm_objective
from moe_jax.train.step import compile_steps, init_state


def step_memory(mcfg, seq: int, batch: int) -> dict[str, float]:
  tcfg = TrainConfig(steps=2, warmup_steps=1)
  state = jax.eval_shape(lambda: init_state(mcfg, tcfg, seq))
  tokens = jax.ShapeDtypeStruct((batch, seq), "int32")
  train, _ = compile_steps(lm_objective(mcfg, tcfg, seq), tcfg)   # the loop's jitted step
  batch_ = {"inputs": tokens, "targets": tokens}
  m = train.lower(state, batch_, None).compile().memory_analysis()
  peak = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  return {"temp_mb": m.temp_size_in_bytes / 2 ** 20, "peak_mb": peak / 2 ** 20}


def run(preset: str = "small", seq: int = 256, batch: int = 32) -> dict:
  out = {"preset": preset, "seq": seq, "batch": batch, "backend": jax.default_backend()}
  for remat in REMATS:
    out[remat] = step_memory(get_config(preset, remat=remat, max_seq_len=seq), seq, batch)
  for remat in REMATS[1:]:
    out[remat]["peak_vs_none"] = out[remat]["peak_mb"] / out["none"]["peak_mb"]
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=32)
  args = p.parse_args()
  print(json.dumps(run(args.preset, args.seq, args.batch), indent=1))


if __name__ == "__main__":
  main()
