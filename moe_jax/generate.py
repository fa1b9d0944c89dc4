"""Generate text from any trained run: python -m moe_jax.generate.

    python -m moe_jax.generate --workdir runs/pretrain_quick/pretrain --prompt "def main("
    python -m moe_jax.generate --workdir runs/X --prompt "The" --max-tokens 64 \\
        --temperature 0.8 --top-p 0.95 --seed 1 --stop "\\n\\n"
    python -m moe_jax.generate --workdir runs/base --adapters runs/lora_r16 --prompt "x"

The model config comes from the checkpoint (nothing to retype); decoding runs through
the serving engine (moe_jax.serve), the one decoder of this codebase.
"""
from __future__ import annotations

import argparse
import sys

from moe_jax.serve.engine import Engine
from moe_jax.serve.load import (CheckpointNotServable, attach_adapters, load_run,
                                tokenizer_for)
from moe_jax.serve.sampling import SamplingConfig
from moe_jax.serve.scheduler import Request, Scheduler


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m moe_jax.generate",
                              description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a training run's work directory")
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: off")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  p.add_argument("--adapters", default=None,
                 help="a LoRA adapter directory (moe_jax.adapt.storage) to serve")
  p.add_argument("--merge-adapters", action="store_true",
                 help="merge the adapters into the weights (default: served unmerged)")
  p.add_argument("--dtype", default=None, help="serve in this dtype, e.g. bfloat16")
  args = p.parse_args(argv)
  try:
    variables, config, meta = load_run(args.workdir, args.step, args.dtype)
    lora_cfg = None
    if args.adapters:
      variables, lora_cfg = attach_adapters(variables, config, args.adapters,
                                            merge=args.merge_adapters)
      lora_cfg = None if args.merge_adapters else lora_cfg
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
  except (CheckpointNotServable, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tok = tokenizer_for(meta)
  engine = Engine(config, batch=1, lora=lora_cfg)
  scheduler = Scheduler(engine, variables, detokenize=tok.decode, eos_id=tok.eos_id)
  request = Request(prompt=[int(t) for t in tok.encode(args.prompt)],
                    max_new_tokens=args.max_tokens, sampling=sampling,
                    stop=tuple(s.encode().decode("unicode_escape") for s in args.stop))
  try:
    scheduler.run([request])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(args.prompt + request.text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
