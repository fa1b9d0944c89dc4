"""python -m moe_jax.serve --workdir runs/X --port 8000: an OpenAI-style endpoint.

    curl -s localhost:8000/v1/completions -d '{"prompt": "def ", "max_tokens": 32}'
    curl -s localhost:8000/health
    python -m moe_jax.serve --workdir runs/base --adapters runs/lora_r16  # unmerged LoRA
"""
from __future__ import annotations

import argparse
import logging
import sys

from moe_jax.serve.engine import Engine
from moe_jax.serve.load import (CheckpointNotServable, attach_adapters, load_run,
                                tokenizer_for)
from moe_jax.serve.scheduler import POLICIES, Scheduler

QUANT = ("none", "int8", "mixed")


def build(args):
  from moe_jax.serve import server
  variables, config, meta = load_run(args.workdir, args.step, args.dtype)
  lora_cfg = None
  if args.adapters:      # before quantizing: merged adapters are quantized with W
    variables, lora_cfg = attach_adapters(variables, config, args.adapters,
                                          merge=args.merge_adapters)
    lora_cfg = None if args.merge_adapters else lora_cfg
  if args.quant != "none":
    from moe_jax.quant import QuantConfig, quantize_params
    qcfg = QuantConfig(scheme="all_high") if args.quant == "int8" else QuantConfig()
    variables = {**variables, "params": quantize_params(variables["params"], qcfg)}
  tok = tokenizer_for(meta)
  engine = Engine(config, batch=args.batch, max_len=args.context, lora=lora_cfg)
  if args.warmup:   # compile every shape now, so no request's latency includes it
    from moe_jax.serve.bench import warm_up
    warm_up(engine, variables, 1 if args.policy == "continuous" else args.batch)
  scheduler = Scheduler(engine, variables, policy=args.policy, detokenize=tok.decode,
                        eos_id=tok.eos_id)
  loop = server.ServingLoop(scheduler).start()
  return server.make_app(loop, tok, model_name=args.workdir), loop


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m moe_jax.serve",
                              description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a training run's work directory")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--batch", type=int, default=8, help="decode slots")
  p.add_argument("--context", type=int, default=0, help="0: the model's max_seq_len")
  p.add_argument("--policy", default="continuous", choices=POLICIES)
  p.add_argument("--quant", default="none", choices=QUANT,
                 help="serve int8 or mixed 8/4-bit weights (moe_jax.quant)")
  p.add_argument("--adapters", default=None,
                 help="a LoRA adapter directory (moe_jax.adapt.storage) to serve")
  p.add_argument("--merge-adapters", action="store_true",
                 help="merge the adapters into the weights (default: served unmerged)")
  p.add_argument("--dtype", default=None, help="e.g. bfloat16")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--no-warmup", dest="warmup", action="store_false",
                 help="skip compiling every prefill / generate shape at start-up")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    from aiohttp import web
  except ImportError:
    print("error: the server needs aiohttp: pip install -e '.[serve]'", file=sys.stderr)
    return 2
  try:
    app, _ = build(args)
  except (CheckpointNotServable, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  web.run_app(app, host=args.host, port=args.port)
  return 0


if __name__ == "__main__":
  sys.exit(main())
