"""Fine-tuning a pretrained base on one domain: full, LoRA, two-stage, frozen.

    python -m experiments.run --exp=finetune            # 3 seeds; BUILD.md has the time
    python -m experiments.run --exp=finetune --quick    # a smoke run: 1 seed, 2 layers,
                                                        # 3 variants, 22 steps each
    python -m experiments.run --exp=finetune --model=small --seeds=1 \
        model.dtype=bfloat16 data.batch_tokens=65536       # a larger preset (GPU)

A base is pretrained through the loop on a code/prose mixture with 5% math (cached
in the work dir: a re-run resumes it at its last step and only evaluates). Each
variant then adapts it to math, the finite fine-tuning set being the math training
split, for the same number of steps (equal tokens): full fine-tuning, LoRA at
r in {4, 16, 64} (all attention, shared-expert, routed-expert and dense matrices),
the source's two stages (epoch 1: lower half of the layers frozen; epoch 2: all),
and the frozen base. The source's lr 1e-5 (x0.95 per epoch, staircase) is run
beside a tuned lr with the same staircase. Reported: the gain on math (held-out
loss, exact-match accuracy on held-out problems), forgetting on code and prose
(held-out loss increase), trainable parameters in %, the size on disk of what a
variant has to store (adapters alone for LoRA, the whole model otherwise), steps/s.

Time goes to compiling, not to steps (milliseconds each): seeds share every compiled
step (equal objectives and schedule objects), and the held-out losses are each run's
own end-of-run evaluation, whose compile all full-model runs share.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from moe_jax import data as data_lib
from moe_jax.adapt import fraction, lora, stages, storage
from moe_jax.config import TrainConfig, get_config
from moe_jax.models.counting import count_params
from moe_jax.train import loop
from moe_jax.train.answer_eval import answer_accuracy

from experiments import common

BASE_MIX = {"code": 0.475, "prose": 0.475, "math": 0.05}
FT_MIX = {"code": 0.0, "prose": 0.0, "math": 1.0}
SOURCE_LR = 1e-5
# Tuned by hand on seed 0 of the quick run (not a sweep): LoRA, whose B starts at
# zero and whose delta is scaled by alpha/r, takes a larger step than full tuning.
TUNED_LR = {"full": 1e-3, "lora": 3e-3, "two-stage": 1e-3}


def configs(scale: str = "default", preset: str | None = None):
  """The CPU model, or `--model=PRESET` (e.g. on a GPU) at the data's length.
  --quick halves the depth: its time is compiling (the layers are unrolled). --full
  (a GPU): 4x the width, 8 layers, 8x the tokens per step, 10x the base steps."""
  width = common.at(scale, 64, 64, 256)
  model = get_config(preset, max_seq_len=64) if preset else get_config(
      "small", d_model=width, d_expert=width, n_experts=8, top_k=2,
      n_layers=common.at(scale, 2, 4, 8), n_heads=4, n_kv_heads=4, d_ff=4 * width,
      max_seq_len=64, dropless_block=32)
  data = data_lib.DataConfig(seq_len=64, batch_tokens=common.at(scale, 1024, 1024, 8192),
                             mixture=BASE_MIX,
                             max_bytes_per_domain=common.at(scale, 100_000, 100_000,
                                                            1_000_000))
  base = TrainConfig(steps=common.at(scale, 60, 400, 4000),
                     warmup_steps=common.at(scale, 5, 30, 200), lr=3e-3, log_every=10,
                     eval_batches=common.at(scale, 2, 4, 8), checkpoint_every=10_000)
  fcfg = stages.FinetuneConfig(epochs=common.at(scale, 0.25, 2.0, 2.0),
                               stage1_epochs=common.at(scale, 0.125, 1.0, 1.0))
  return model, data, base, fcfg


def variants(quick: bool):
  """(name, kind, lr, LoRA rank). --quick keeps one row per code path (full, LoRA,
  two stages, the source lr): its time goes to compiling steps, one per row."""
  out = [("full, lr 1e-5 (source)", "full", SOURCE_LR, 0),
         ("full, tuned lr", "full", TUNED_LR["full"], 0)]
  out += [(f"LoRA r={r}, tuned lr", "lora", TUNED_LR["lora"], r) for r in (4, 16, 64)]
  out += [("LoRA r=16, lr 1e-5 (source)", "lora", SOURCE_LR, 16),
          ("two-stage, lr 1e-5 (source)", "two-stage", SOURCE_LR, 0),
          ("two-stage, tuned lr", "two-stage", TUNED_LR["two-stage"], 0)]
  if quick:
    keep = ("full, tuned lr", "LoRA r=16, tuned lr", "two-stage, lr 1e-5 (source)")
    out = [v for v in out if v[0] in keep]
  return out


def run(ctx: common.Context):
  model, data, base_cfg, fcfg = configs(ctx.scale, ctx.model)
  model, data, base_cfg = ctx.configs(model, data, base_cfg)
  corpus = data_lib.corpus_from_config(data)
  tokenizer = data_lib.get_tokenizer(data.tokenizer)
  problems = data_lib.problems_in(list(corpus.split("heldout")["math"]))[
      :common.at(ctx.scale, 64, 256, 1024)]
  base = ctx.train("base", model, data, base_cfg)          # resumes: cached in the workdir
  base_params = base.state.params
  base_bias = base.state.extra.get("router_bias", {})
  ft_data = dataclasses.replace(data, mixture=FT_MIX)
  epoch = stages.epoch_steps(ft_data, "math", corpus)
  steps = max(1, round(fcfg.epochs * epoch))
  ft_train = base_cfg.replace(steps=steps, warmup_steps=0, log_every=min(10, steps))
  total = count_params(model).total
  run_kw = dict(mesh=ctx.mesh, progress=ctx.progress, corpus=corpus)
  # Held-out losses come from each run's own end-of-run evaluation (the loop's, on
  # the same fixed batches, base_cfg.eval_batches per domain): no model is evaluated
  # twice. Exact match is one teacher-forced forward pass (train/answer_eval.py).
  accuracy = lambda params, bias: answer_accuracy(_variables(params, bias), model, problems,
                                                  tokenizer)
  rows = [dict(variant="frozen base", seed=0, lr=0.0, trainable_pct=0.0, disk_kb=0.0,
               steps_per_s=float("nan"), **_losses(base),
               **accuracy(base_params, base_bias))]
  for seed in range(ctx.n_seeds(3)):
    sdata = dataclasses.replace(ft_data, seed=data.seed + 1 + seed)
    for name, kind, lr, rank in variants(ctx.quick):
      # Seeds share every compiled step: equal configs, objective functions and
      # schedule objects (the key of step.compile_steps' cache).
      tcfg = ft_train.replace(seed=seed, lr=lr)
      sched = stages.staircase(lr, fcfg.lr_decay, epoch)
      workdir = str(ctx.workdir / f"seed{seed}" / _slug(name))
      row = dict(variant=name, seed=seed, lr=lr)
      if kind == "two-stage":
        out = stages.two_stage(model, sdata, tcfg, fcfg.replace(lr=lr), workdir,
                               base_params=base_params, router_bias=base_bias,
                               steps_per_epoch=epoch, **run_kw)
        params, bias = out.params, out.router_bias
        frozen_sets = stages.lower_layer_freeze(model, model.n_layers // 2)
        trained1 = _trainable(out.stage1.state.params, frozen_sets)
        rates = [_steps_per_s(r, sdata) for r in (out.stage1, out.stage2)]
        row.update(trainable_pct=100.0 * trained1 / total, trainable_pct_stage2=100.0,
                   steps_per_s=float(np.nanmean(rates)) if np.isfinite(rates).any()
                   else float("nan"))
        result = out.stage2
      elif kind == "lora":
        lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
        obj = stages.lora_objective(model, tcfg, lcfg, base_params, router_bias=base_bias,
                                    schedule=sched)
        result = loop.train(model, sdata, tcfg, workdir, objective=obj,
                            frozen={"base": base_params}, desc=name, **run_kw)
        params = lora.merge(base_params, result.state.params, lcfg)
        bias = result.state.extra["router_bias"]
        row.update(trainable_pct=100.0 * lora.adapter_size(result.state.params) / total,
                   steps_per_s=_steps_per_s(result, sdata))
        if seed == 0:
          row["disk_kb"] = storage.save_adapters(f"{workdir}/adapters", result.state.params,
                                                 lcfg, base=dataclasses.asdict(model)) / 1e3
      else:
        obj = stages.full_objective(model, tcfg, base_params, router_bias=base_bias,
                                    schedule=sched)
        result = loop.train(model, sdata, tcfg, workdir, objective=obj, desc=name, **run_kw)
        params, bias = result.state.params, result.state.extra["router_bias"]
        row.update(trainable_pct=100.0, steps_per_s=_steps_per_s(result, sdata))
      if seed == 0 and "disk_kb" not in row:
        row["disk_kb"] = _model_kb(f"{workdir}/model", params)
      row.update(_losses(result), **accuracy(params, bias))
      row["train_tokens"] = steps * sdata.batch_tokens
      rows.append(row)
  fractions = [] if ctx.quick else fraction_rows()
  return rows + fractions, summarise(rows, ctx, epoch, steps, len(problems), fractions)


def _variables(params, bias):
  return {"params": params, **({"router_bias": bias} if bias else {})}


def _losses(result) -> dict[str, float]:
  """Held-out loss per domain of a run's final model (its end-of-run evaluation)."""
  return {f"{d}_loss": r["loss"] for d, r in result.eval.items()}


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _trainable(params, freeze: tuple[str, ...]) -> int:
  flat = traverse_util.flatten_dict(params, sep="/")
  return sum(v.size for k, v in flat.items() if not any(re.search(f, k) for f in freeze))


def _steps_per_s(result, dcfg) -> float:
  return result.tokens_per_s / (dcfg.batch_size * dcfg.seq_len)


def _model_kb(path: str, params) -> float:
  """What full fine-tuning has to store: the whole model (same orbax format)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(Path(path).resolve(), jax.tree.map(np.asarray, params), force=True)
  return storage.disk_bytes(path) / 1e3


def summarise(rows, ctx, epoch: int, steps: int, n_problems: int, fractions=()):
  frozen = rows[0]
  names = list(dict.fromkeys(r["variant"] for r in rows))
  table = []
  for name in names:
    group = [r for r in rows if r["variant"] == name]
    m = lambda k: common.mean_std(group, k)
    ft = m("math_loss")
    forget = [np.mean([r[f"{d}_loss"] - frozen[f"{d}_loss"] for d in ("code", "prose")])
              for r in group]
    table.append({
        "variant": name, "seeds": len(group), "lr": group[0]["lr"],
        "math_loss": f"{ft[0]:.3f} ± {ft[1]:.3f}",
        "math_gain": f"{frozen['math_loss'] - ft[0]:+.3f}",
        "exact_match": f"{m('exact_match')[0]:.3f} ± {m('exact_match')[1]:.3f}",
        "forgetting": f"{np.mean(forget):+.3f} ± {_sd(forget):.3f}",
        "trainable_%": _pct(group[0]),
        "disk_KB": round(group[0].get("disk_kb", 0.0), 1),
        "steps_per_s": _num(m("steps_per_s")[0])})
  text = (fraction_text(list(fractions)) if fractions else
          "(The preset table of LoRA parameter fractions is in the default run.)") + (
      f"\n\nFine-tuning set: the math training split, {epoch} steps per epoch of "
      f"{rows[-1]['train_tokens'] // steps:,} tokens; every variant trains {steps} steps "
      f"({rows[-1]['train_tokens']:,} tokens). math_gain: held-out math loss of the frozen "
      f"base minus the variant's (higher is better); exact_match on {n_problems} held-out "
      f"problems; forgetting: held-out code/prose loss increase over the frozen base "
      f"(lower is better). Two-stage: trainable_% is stage 1's (top half) / stage 2's. "
      f"steps/s measured on a shared CPU: compare within this table only.")
  return {"table": table, "text": text}


def _sd(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _num(x: float):
  """Rounded, or "-" where not measured (frozen; a stage too short to time past
  its compiling first window)."""
  return round(x, 1) if np.isfinite(x) else "-"


def _pct(row) -> str:
  if "trainable_pct_stage2" in row:
    return f"{row['trainable_pct']:.1f} -> {row['trainable_pct_stage2']:.0f}"
  return f"{row['trainable_pct']:.3g}"


def fraction_rows() -> list[dict]:
  """The source's "0.7% at r = 16", counted on the presets (abstract shapes): one
  results row per (preset, adapted matrices), which the claims audit reads."""
  rows = []
  for preset in ("seed_24l", "deepseek_v3"):
    cfg = get_config(preset)
    for label, targets in (("all matrices", tuple(lora.TARGETS.values())),
                           ("attention only", (lora.TARGETS["attention"],))):
      n = fraction.lora_count(cfg, lora.LoraConfig(rank=16, targets=targets))
      rows.append({"part": "lora_fraction", "preset": preset, "d_model": cfg.d_model,
                   "adapted": label, "rank": 16, "adapter_params": n.adapter_total,
                   "fraction_total_%": 100 * n.fraction_total,
                   "fraction_active_%": 100 * n.fraction_active})
  return rows


def fraction_text(rows: list[dict] | None = None) -> str:
  lines = ["LoRA parameters at r = 16 (formula r (d_in + d_out) / (d_in d_out) per "
           "matrix, summed over adapted matrices), source claim: about 0.7%:", "",
           "| preset | adapted | % of total | % of active |", "|---|---|---|---|"]
  lines += [f"| {r['preset']} (d={r['d_model']}) | {r['adapted']} | "
            f"{r['fraction_total_%']:.2f} | {r['fraction_active_%']:.2f} |"
            for r in rows or fraction_rows()]
  lines += ["", f"A square d x d matrix is at 0.7% when d = 2r/0.007 = "
                f"{fraction.square_width_for(16, 0.007):,.0f}."]
  return "\n".join(lines)
