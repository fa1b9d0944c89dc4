"""Cross-layer parameter sharing ablation, with code BLEU measured by generation.

    python -m experiments.run --exp=sharing_ablation          # 3 seeds; BUILD.md has the time
    python -m experiments.run --exp=sharing_ablation --quick  # 1 seed, 2 layers: smoke

    8 layers, same tokens:  none | source | all (ALBERT) | cycle   compute-matched
    unshared, fewer layers: none (param-matched)                   parameter-matched
      each run ──> held-out loss / next-token accuracy per domain
               ──> held-out stdlib functions: signature + docstring
                   ──greedy, KV cache──> body ──sacrebleu──> code_bleu
                   (moe_jax/train/code_eval.py)

An 8-layer MoE LM trained on the same tokens with: no sharing; the source's scheme
(scaled from 24 to 8 layers: layers 1-2 share one set, layers 3-6 share attention
in one group of 4 and feed-forward in pairs, layers 7-8 independent); all layers
shared (ALBERT); and cycle ABCDABCD. These four do the same compute per token
(compute-matched). A fifth row, `none (param-matched)`, shares nothing and has the
depth whose STORED parameters come nearest the source scheme's (counted with
`count_params` from the resolved configs, so overrides move it too): the baseline
the source's "37% fewer parameters" trades against. Every row trains 3 seeds
(initialisation and data order); cells are mean ± sd, differences paired by seed.

Code BLEU, the source's metric: the held-out standard-library functions with a
docstring whose signature + docstring fit the context with room for `N_NEW` bytes
are completed greedily through the serving engine (one compile per model shape,
shared by the seeds) and scored against the reference body with sacrebleu
(`code_eval`: both sides cut to whole body lines within `N_NEW` bytes). Next-token
accuracy on held-out code (`code_acc`) is kept beside it: it was the stand-in. The
context is 256 bytes (it was 128), so that functions with a docstring fit it.
The source claims 37% fewer parameters and +2.3 BLEU on code generation; at 24
layers and the seed_24l shape its scheme stores 45% fewer parameters
(`tests/test_sharing.py`).

Time goes to steps (the 8-layer model trains at a few thousand tokens/s on 2 cores);
compiles are shared: the seeds of a row reuse its train / eval step (moe_jax/train/
step.py caches them by config) and its engine (code_eval caches one per config).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax import data as data_lib
from moe_jax.config import ModelConfig, TrainConfig, get_config
from moe_jax.models.counting import count_params
from moe_jax.train import code_eval

from experiments import common, plots

# (table name, run-directory slug, sharing strategy); the param-matched row is added
# after the source row, at the depth `param_matched` picks.
VARIANTS = [("none", "none", "none"), ("source", "source", "source"),
            ("all (ALBERT)", "all", "all"), ("cycle ABCD", "cycle", "cycle")]
MATCHED = "none (param-matched)"
ORDER = ["none", MATCHED, "source", "all (ALBERT)", "cycle ABCD"]
N_NEW = 64              # completion budget in bytes (byte tokenizer: one token each)
N_FUNCTIONS = 96        # at most; 87 held-out functions fit 256 bytes with python 3.11
CLAIMED_FEWER, CLAIMED_BLEU = 37.0, 2.3


def configs(scale: str = "default"):
  """The default: 8 layers, 80 steps of 2,048 tokens (a 256-byte context holds a
  function with its docstring). --quick is a smoke run of the mechanism, sized by
  its compiles (5 models x train, eval and engine programs, cost ~ depth): 2 layers
  (where the source's scheme is ALBERT's), 10 steps of 1,024 tokens. --full (a GPU):
  the source's 24 layers (its scheme unscaled), 4x the width, a 512-byte context,
  32x the tokens per step, 2,000 steps."""
  width = common.at(scale, 96, 96, 384)
  model = get_config("small", n_layers=common.at(scale, 2, 8, 24), d_model=width,
                     d_expert=width, n_experts=8, top_k=2,
                     max_seq_len=common.at(scale, 256, 256, 512), share_sets=4)
  data = data_lib.DataConfig(seq_len=model.max_seq_len,
                             batch_tokens=common.at(scale, 1024, 2048, 65_536))
  train = TrainConfig(steps=common.at(scale, 10, 80, 2000),
                      warmup_steps=common.at(scale, 2, 8, 100), lr=3e-3,
                      log_every=common.at(scale, 5, 10, 20),
                      eval_batches=common.at(scale, 1, 4, 8), checkpoint_every=1000)
  return model, data, train


def param_matched(model: ModelConfig, target: int) -> ModelConfig:
  """The unshared model of the same width whose stored parameters come nearest
  `target`, over depths 1..model.n_layers (ties: the deeper)."""
  candidates = [model.replace(sharing="none", n_layers=n)
                for n in range(model.n_layers, 0, -1)]
  return min(candidates, key=lambda c: abs(count_params(c).total - target))


def run(ctx: common.Context):
  model, data, train = ctx.configs(*configs(ctx.scale))      # resolved once
  variants = [(name, slug, model.replace(sharing=s)) for name, slug, s in VARIANTS]
  source_total = count_params(variants[1][2]).total
  variants.insert(1, (MATCHED, "matched", param_matched(model, source_total)))
  n_functions = common.at(ctx.scale, 8, N_FUNCTIONS, 4 * N_FUNCTIONS)
  n_new = min(N_NEW, model.max_seq_len // 4)       # a shrunken context (tests) shrinks it
  pairs = code_eval.heldout_pairs(model.max_seq_len - n_new - 1, n_new, n_functions)
  tokenizer = data_lib.get_tokenizer(data.tokenizer)
  rows = []
  for seed in range(ctx.n_seeds(3)):
    sdata, strain = dataclasses.replace(data, seed=seed), train.replace(seed=seed)
    for name, slug, cfg in variants:
      result = ctx.train(f"{slug} seed{seed}", cfg, sdata, strain, resolved=True)
      state = result.state
      variables = {"params": state.params, **({"router_bias": state.router_bias}
                                              if state.router_bias else {})}
      gen = code_eval.code_bleu(variables, result.model, pairs, tokenizer, n_new,
                                batch=len(pairs))
      row = common.run_row(result, variant=name, seed=seed, layers=cfg.n_layers)
      row.update(code_bleu=gen["bleu"], code_exact=gen["exact"], code_functions=gen["n"],
                 code_new_bytes=n_new)
      if seed == 0:
        row["completions"] = {p.name: c for p, c in zip(pairs, gen["completions"])}
      rows.append(row)
  return rows, summarise(rows, ctx)


def summarise(rows, ctx):
  runs = {n: [r for r in rows if r["variant"] == n] for n in ORDER}
  none_total = runs["none"][0]["params_total"]
  table = []
  for name in ORDER:
    rs = runs[name]
    table.append({
        "variant": name, "layers": rs[0]["layers"], "seeds": len(rs),
        "params_total": rs[0]["params_total"], "params_active": rs[0]["params_active"],
        "fewer_params_%": 100.0 * (1 - rs[0]["params_total"] / none_total),
        "code_bleu": common.pm([r["code_bleu"] for r in rs], 2),
        "code_acc": common.pm([r["code_acc"] for r in rs], 4),
        "code_loss": common.pm([r["code_loss"] for r in rs]),
        "prose_loss": common.pm([r["prose_loss"] for r in rs]),
        "math_loss": common.pm([r["math_loss"] for r in rs]),
        "tokens_per_s": float(np.nanmean([r["tokens_per_s"] for r in rs]))})
  figs = [plots.curves(rows, "loss", "train cross-entropy (mean over seeds)",
                       ctx.workdir / "loss.png", "Training loss by sharing strategy")]
  return {"table": table, "text": _text(rows, runs, table), "plots": figs}


def _text(rows, runs, table) -> str:
  t = {e["variant"]: e for e in table}
  cfg = rows[0]["configs"]
  steps, batch = cfg["train"]["steps"], cfg["data"]["batch_tokens"]
  n = len(runs["none"])
  src, matched = t["source"], t[MATCHED]
  gap = 100.0 * (matched["params_total"] / src["params_total"] - 1)
  d_none = common.paired(rows, "code_bleu", "source", "none")
  d_matched = common.paired(rows, "code_bleu", "source", MATCHED)
  d_acc = [100 * d for d in common.paired(rows, "code_acc", "source", "none")]
  holds = np.mean(d_none) >= CLAIMED_BLEU / 2
  best = max(float(np.mean([r["code_bleu"] for r in rs])) for rs in runs.values())
  functions = runs["none"][0]["code_functions"]
  return (
      f"Every cell: mean ± sd over {n} seed(s) (initialisation and data order). Equal "
      f"tokens: every row trains {steps} steps of {batch:,} tokens "
      f"({steps * batch:,}). **Compute-matched**: none, source, all (ALBERT) and cycle "
      f"ABCD ({t['none']['layers']} layers, {t['none']['params_active']:,} active "
      f"parameters per token each). **Parameter-matched**: `{MATCHED}` shares nothing "
      f"at {matched['layers']} layer{'s' if matched['layers'] != 1 else ''} and stores {matched['params_total']:,} parameters, "
      f"{gap:+.1f}% of the source scheme's {src['params_total']:,} (less compute per "
      f"token: {matched['params_active']:,} active). `code_bleu`: corpus BLEU "
      f"(sacrebleu, 13a) of greedy KV-cache completions of {functions} held-out "
      f"standard-library functions from their signature and docstring, both sides cut "
      f"to whole body lines within {runs['none'][0]['code_new_bytes']} bytes "
      f"(moe_jax/train/code_eval.py); "
      f"`code_acc` is next-token accuracy on held-out code, the former stand-in.\n\n"
      f"**Source claims: 37% fewer parameters, +2.3 BLEU on code generation. Measured "
      f"with the source's scheme at {t['none']['layers']} layers: "
      f"{src['fewer_params_%']:.0f}% fewer parameters; code BLEU {src['code_bleu']} vs "
      f"{t['none']['code_bleu']} unshared (paired difference "
      f"{common.pm(d_none, 2, sign=True)}) and {matched['code_bleu']} for the "
      f"parameter-matched unshared model ({common.pm(d_matched, 2, sign=True)}); code "
      f"next-token accuracy {common.pm(d_acc, 2, sign=True)} points vs unshared.** "
      + (f"No row reaches 1 BLEU (best {best:.2f}): models this small and this briefly "
         f"trained do not yet write function bodies, so BLEU cannot separate the "
         f"schemes at this scale and the +2.3 BLEU claim is not tested by this run."
         if best < 1.0 else
         "The BLEU gain reaches half the claimed +2.3 against the same-depth unshared "
         "model." if holds else
         "The claimed +2.3 BLEU does not reproduce at this scale: the difference is "
         "below half of it (the claims audit's threshold)."))
