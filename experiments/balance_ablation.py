"""Load-balance ablation: does the source's balance loss even out expert utilisation?

    python -m experiments.run --exp=balance_ablation            # 3 seeds x 12 rows, 200
                                                                # steps; BUILD.md: time
    python -m experiments.run --exp=balance_ablation --quick    # 1 seed x 6 rows, 20 steps

    16 experts, top-2 ──┬─ none
                        ├─ source  alpha sum_i (f_i/mu - 1)^2     alpha 0.001, 0.01, 0.1
                        ├─ Switch  alpha E sum_i f_i P_i          alpha 0.01 (equal), 0.32 (matched)
                        └─ aux-loss-free  b_i += gamma sign(mean load - load_i)
                                                                  gamma 0.001 (V3), 0.01, 0.1
    32 experts in 4 groups, top-4 from the best 2 groups ── none, source 0.01, aux-free 0.01

Trains the same small MoE LM (d_model 96, 2 MoE layers) on the embedded
code/prose/math corpus, every row for the same steps of the same batch (equal
tokens), 3 seeds each (seed = initialisation and data order). Utilisation is measured
on held-out text after training: the standard deviation of the relative expert load
f_i/mu (the source's "utilisation std"; its monitoring limit is 0.15), MaxVio and
dead experts, averaged over layers; plus held-out loss, the training-loss
fluctuation over the last 50 per-step losses (the source's monitoring limit 0.3) and
throughput. Every table cell is mean ± sd over the seeds; reductions are paired per
seed with the block's no-balance row. The source claims the balance loss cuts the
utilisation std by 62%.

Gradient-matched Switch. Our source loss takes its value from the hard fractions f_i
and its gradient through the mean router probability P_i (moe_jax/losses.py). Its
gradient is 2 alpha E (E f_i - 1); Switch's is alpha_w E f_i. The P_i sum to one, so
the constant -2 alpha E moves no parameter, and the two gradients are *equal* at
alpha_w = 2 E alpha (`losses.switch_alpha_matching_source`; tests/test_losses.py
checks the router's gradients, softmax and sigmoid scores). For this config, E = 16 and alpha 0.01: 0.32,
computed from the resolved config (an override of model.n_experts moves it). So at
equal alpha the comparison is of strength (32x), not of form; "switch a=0.32" should
match "source a=0.01" within seed noise.

Expert groups. The source organises 128 experts in groups and routes top-4. At small
width: 32 experts of width 48 in 4 groups of 8; each token picks its best 2 groups
(by its best expert's score, or its best two with the bias, as in DeepSeek-V3) and
its top-4 experts inside them. 4 x 48 = 2 x 96: the same active expert width as the
16-expert top-2 rows, so the same compute per token.

Step count. The runs record `curves` (utilisation std of each 10-step window of
training batches). The count is where the curves flatten: `std_drift_%` is, per seed,
the change of the mean std over the last 20% of logged steps against the 20% before,
and a row counts as flat when |mean drift| < 10%; the results text lists the rows
that are not. How 200 steps was chosen (one seed of four rows at 2,048 tokens per
step, on a shared machine): none -0.1%, source a=0.01 -1.1% (flat from ~step 140), aux-free
g=0.001 -44%, groups source a=0.01 -34% (std still falling, 0.18 -> 0.11 over the
last 40 steps). 200 steps is what 36 runs afford in 20 min; V3's gamma 0.001 moves a
bias by at most 0.2 in 200 steps and needs more, which is what the faster gammas of
the sweep show. Raise train.steps (e.g. 400, about twice the time) for the slow rows to settle.

Time. Seeds share each row's compiled train and eval steps (moe_jax/train/step.py
caches them by config and objective; the seed is bookkeeping), so compiling costs
once per row, not per run. `seconds` in each run row is its wall time (the first
seed's includes the compile). The step time is the MoE block's dispatch, not the
host: at 2,048 tokens per step the default took 23.7 min alone on 2 cores, over the
20-minute target, so it trains on 1,024-token batches (the same 200 steps: the bias
and balance dynamics are per step) and evaluates 8 batches (the same 8,192 held-out
tokens as before).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from moe_jax import data as data_lib
from moe_jax.config import TrainConfig, get_config
from moe_jax.losses import switch_alpha_matching_source

from experiments import common, plots

SOURCE_ALPHA = 0.01
GAMMAS = (0.001, 0.01, 0.1)                # V3 uses 0.001 over ~15T tokens
# The grouped block: twice the experts at half the width (d_expert // 2, 48 in the
# default), top-4 from the best 2 of 4 groups: the same active width as top-2 of 16.
GROUPED = dict(n_experts=32, top_k=4, n_groups=4, topk_groups=2)
REFERENCE, SOURCE = "none", f"source a={SOURCE_ALPHA:g}"
GROUP_REFERENCE = "groups none"
# --quick: a smoke run of the rows the text and the claims read.
QUICK_ROWS = (REFERENCE, SOURCE, "aux-free g=0.01", GROUP_REFERENCE, f"groups {SOURCE}")
STEPS = 200            # what 36 runs afford in 20 min; most std curves flat (docstring)
FLAT_PCT = 10.0        # |std drift| over the last 20% of steps below this: flat
TAIL = 0.2


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  model: dict
  train: dict
  reference: str = REFERENCE          # the row its reduction is paired with


def variants(model, quick: bool) -> list[Variant]:
  """The rows; the gradient-matched Switch alpha and the grouped block's width follow
  the resolved model (overrides move them)."""
  matched = switch_alpha_matching_source(SOURCE_ALPHA, model.n_experts)
  grouped = dict(GROUPED, d_expert=model.d_expert // 2)
  out = [Variant(REFERENCE, {}, dict(balance_loss="none"))]
  out += [Variant(f"source a={a:g}", {}, dict(balance_loss="source", balance_alpha=a))
          for a in (0.001, SOURCE_ALPHA, 0.1)]
  out += [Variant(f"switch a={a:g}", {}, dict(balance_loss="switch", balance_alpha=a))
          for a in (SOURCE_ALPHA, matched)]
  out += [Variant(f"aux-free g={g:g}", dict(router_bias=True),
                  dict(balance_loss="none", bias_update_gamma=g)) for g in GAMMAS]
  out += [Variant(f"groups {v.name}", {**grouped, **v.model}, v.train, GROUP_REFERENCE)
          for v in out if v.name in (REFERENCE, SOURCE, "aux-free g=0.01")]
  if quick:
    out = [v for v in out if v.name in QUICK_ROWS or v.name == f"switch a={matched:g}"]
  return out


def configs(scale: str = "default"):
  """--full (a GPU): 4x the width, 4 layers, 32x the tokens per step, 2,000 steps."""
  width = common.at(scale, 96, 96, 384)
  model = get_config("small", d_model=width, d_expert=width, n_experts=16, top_k=2,
                     n_layers=common.at(scale, 2, 2, 4),
                     max_seq_len=common.at(scale, 128, 128, 512))
  data = data_lib.DataConfig(seq_len=model.max_seq_len,
                             batch_tokens=common.at(scale, 2048, 1024, 65_536))
  train = TrainConfig(steps=common.at(scale, 20, STEPS, 2000),
                      warmup_steps=common.at(scale, 5, 20, 100), lr=3e-3,
                      log_every=common.at(scale, 5, 10, 20),
                      eval_batches=common.at(scale, 1, 8, 8), checkpoint_every=1000)
  return model, data, train


def run(ctx: common.Context):
  # Resolved once: each row's own settings (the grouped block's width, the balance
  # term) then win over the command line's overrides, which apply to the base.
  model, data, train = ctx.configs(*configs(ctx.scale))
  rows = []
  for seed in range(ctx.n_seeds(default=3)):
    for v in variants(model, ctx.quick):
      start = time.perf_counter()
      result = ctx.train(f"{v.name} seed{seed}", model.replace(**v.model),
                         dataclasses.replace(data, seed=seed),
                         train.replace(seed=seed, **v.train), resolved=True)
      row = common.run_row(result, variant=v.name, reference=v.reference, seed=seed)
      row["seconds"] = time.perf_counter() - start
      # Over the last FLUCTUATION_WINDOW per-step losses (train/loop.py).
      row["loss_fluctuation"] = (result.history[-1]["loss_fluctuation"]
                                 if result.history else float("nan"))
      row["std_drift_%"] = std_drift(row["curves"]["load_std"])
      rows.append(row)
  return rows, summarise(rows, ctx)


def std_drift(curve: list[float], tail: float = TAIL) -> float:
  """100 (mean of the last `tail` of the curve / mean of the `tail` before - 1)."""
  y = np.asarray(curve, dtype=float)
  n = max(1, int(round(tail * y.size)))
  if y.size < 2 * n:
    return float("nan")
  last, before = y[-n:].mean(), y[-2 * n:-n].mean()
  return float(100.0 * (last / before - 1.0))


def summarise(rows, ctx):
  names = list(dict.fromkeys(r["variant"] for r in rows))
  runs = {n: [r for r in rows if r["variant"] == n] for n in names}
  table = []
  for name in names:
    rs = runs[name]
    entry = {"variant": name, "load_std": common.pm([r["load_std"] for r in rs])}
    # per seed: 100 (1 - std / the same seed's reference std)
    entry["std_reduction_%"] = common.pm(
        [-c for c in common.paired(rows, "load_std", name, rs[0]["reference"], True)], 1)
    entry["max_vio"] = common.pm([r["max_vio"] for r in rs], 2)
    entry["dead_experts"] = common.pm([r["dead_experts"] for r in rs], 1)
    entry["val_loss"] = common.pm([r["val_loss"] for r in rs])
    entry["loss_fluctuation"] = common.pm([r["loss_fluctuation"] for r in rs])
    entry["std_drift_%"] = common.pm([r["std_drift_%"] for r in rs], 1)
    entry["tokens_per_s"] = common.pm([r["tokens_per_s"] for r in rs], 0)
    entry["seeds"] = len(rs)
    table.append(entry)
  return {"table": table, "text": _text(rows, runs, table), "plots": _plots(rows, ctx)}


def _mean(runs: list[dict], key: str) -> float:
  return float(np.mean([r[key] for r in runs]))


def _text(rows, runs, table) -> str:
  t = {e["variant"]: e for e in table}
  cfg = rows[0]["configs"]
  steps, batch = cfg["train"]["steps"], cfg["data"]["batch_tokens"]
  n = len(runs[rows[0]["variant"]])
  model = cfg["model"]
  lines = [
      f"Utilisation std = std of f_i/mu on held-out text after training, mean over "
      f"layers. Every cell: mean ± sd over {n} seed(s) (initialisation and data order); "
      f"`std_reduction_%` is paired per seed with the block's no-balance row (`none`, "
      f"or `groups none` for the grouped rows). Equal tokens: every row trains {steps} "
      f"steps of {batch:,} tokens ({steps * batch:,}); the grouped rows ("
      f"{GROUPED['n_experts']} experts of width {model['d_expert'] // 2}, top-"
      f"{GROUPED['top_k']} from the best {GROUPED['topk_groups']} of "
      f"{GROUPED['n_groups']} groups) have the same active expert width as the others "
      f"({model['n_experts']} experts of width {model['d_expert']}, top-{model['top_k']})."
      f" `std_drift_%`: change of the training-batch std over the last "
      f"{TAIL:.0%} of steps against the {TAIL:.0%} before; "
      f"`loss_fluctuation`: over the last 50 per-step training losses."]
  if SOURCE in t and REFERENCE in t:
    lines.append(
        f"**Source claim: the balance loss cuts the utilisation std by 62%. Measured "
        f"(alpha {SOURCE_ALPHA:g} vs no balance term): {t[SOURCE]['std_reduction_%']}% "
        f"({t[REFERENCE]['load_std']} -> {t[SOURCE]['load_std']}).** Held-out loss "
        f"{t[REFERENCE]['val_loss']} without, {t[SOURCE]['val_loss']} with.")
  matched = f"switch a={switch_alpha_matching_source(SOURCE_ALPHA, model['n_experts']):g}"
  equal = f"switch a={SOURCE_ALPHA:g}"
  if matched in t and SOURCE in t:
    also = (f"; at equal alpha ({equal}, a {2 * model['n_experts']}x weaker gradient) "
            f"std {t[equal]['load_std']}, loss {t[equal]['val_loss']}" if equal in t else "")
    lines.append(
        f"**Switch vs the source's form.** At the gradient-matched alpha ({matched}) the "
        f"two gradients are equal (moe_jax/losses.py): std {t[matched]['load_std']} vs "
        f"{t[SOURCE]['load_std']} ({SOURCE}), held-out loss {t[matched]['val_loss']} vs "
        f"{t[SOURCE]['val_loss']}{also}.")
  free = [name for name in t if name.startswith("aux-free")]
  if free:
    lines.append("**Aux-loss-free bias, gamma sweep** (V3 uses 0.001): " + "; ".join(
        f"{name}: std {t[name]['load_std']}, loss {t[name]['val_loss']}" for name in free)
        + ".")
  grouped = [name for name in t if name.startswith("groups ")]
  if grouped:
    lines.append("**Expert groups:** " + "; ".join(
        f"{name}: std {t[name]['load_std']} ({t[name]['std_reduction_%']}% vs groups "
        f"none), loss {t[name]['val_loss']}" for name in grouped) + ".")
  drift = {name: _mean(runs[name], "std_drift_%") for name in t}
  moving = [f"{name} ({d:+.0f}%)" for name, d in drift.items() if not abs(d) < FLAT_PCT]
  lines.append(
      f"Flat curves (|mean std drift| < {FLAT_PCT:g}% over the last {TAIL:.0%} of "
      f"steps): " + ("all rows." if not moving else
                     f"all but {', '.join(moving)}: still moving at {steps} steps."))
  total = sum(r["seconds"] for r in rows)
  lines.append(f"Wall time of the training runs: {total / 60:.1f} min "
               f"({len(rows)} runs; seeds share each row's compiled steps).")
  return "\n\n".join(lines)


def _plots(rows, ctx) -> list[str]:
  flat = [r for r in rows if r["reference"] == REFERENCE]
  grouped = [r for r in rows if r["reference"] == GROUP_REFERENCE]
  figs = [plots.curves(flat, "load_std", "utilisation std (train batches)",
                       ctx.workdir / "load_std.png", "Expert utilisation std over training"),
          plots.curves(rows, "loss", "train cross-entropy", ctx.workdir / "loss.png",
                       "Training loss")]
  if grouped:
    figs.append(plots.curves(grouped, "load_std", "utilisation std (train batches)",
                             ctx.workdir / "load_std_groups.png",
                             "Expert groups: utilisation std over training"))
  bars = {r["variant"]: r["eval_load"] for r in flat if r["seed"] == 0
          and r["variant"] in (REFERENCE, SOURCE, "aux-free g=0.01")}
  if bars:
    figs.append(plots.expert_load_bars(bars, ctx.workdir / "expert_load.png",
                                       "Per-expert load after training, seed 0"))
  return figs
