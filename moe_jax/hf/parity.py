"""Logit parity of converted checkpoints against logits saved by transformers.

    python -m moe_jax.hf.parity tests/fixtures/hf        # one row per fixture directory

Each directory holds an HF checkpoint plus input_ids.npy and logits.npy (written by
tests/fixtures/make_hf_fixtures.py); the table gives the largest absolute logit
difference, the share of positions with the same top-1 token, and the import time.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from moe_jax.hf.convert import import_hf
from moe_jax.models.transformer import Transformer


def check(directory: str) -> dict:
  t0 = time.perf_counter()
  config, params, bias, _, arch = import_hf(directory)
  seconds = time.perf_counter() - t0
  ids = np.load(os.path.join(directory, "input_ids.npy"))
  ref = np.load(os.path.join(directory, "logits.npy"))
  variables = {"params": params, **({"router_bias": bias} if bias else {})}
  ours = np.asarray(jax.jit(lambda v, x: Transformer(config).apply(v, x)[0])(variables, ids))
  return {"arch": arch, "tokens": ids.size, "max_abs_diff": float(np.abs(ours - ref).max()),
          "top1_agree": float(np.mean(ours.argmax(-1) == ref.argmax(-1))),
          "import_s": seconds}


def main(argv=None) -> int:
  root = (argv or sys.argv[1:] or ["tests/fixtures/hf"])[0]
  print("| architecture | tokens | max abs logit diff | same top-1 | import (s) |")
  print("|---|---|---|---|---|")
  for name in sorted(os.listdir(root)):
    if os.path.isfile(os.path.join(root, name, "config.json")):
      r = check(os.path.join(root, name))
      print(f"| {r['arch']} | {r['tokens']} | {r['max_abs_diff']:.1e} | "
            f"{r['top1_agree']:.0%} | {r['import_s']:.2f} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
