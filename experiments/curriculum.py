"""Curriculum domain adaptation (the source's training stages 1 and 2).

    python -m experiments.run --exp=curriculum            # ~7 min on 2 CPU cores
    python -m experiments.run --exp=curriculum --quick    # ~1.5 min

Stage 1 (base) trains on a mixture with 5% math. Stage 2 continues from that model
for the same number of tokens three ways: the source's curriculum, which raises the
math share linearly from 5% to 30%; the base mixture unchanged (5%); and a fixed
17.5% mixture that sees the same number of math tokens as the curriculum, so that
ordering, not quantity, is what differs. Reported on held-out data: exact-match
accuracy on held-out math problems (greedy answer == reference, scored in one
teacher-forced pass, see `moe_jax/train/answer_eval.py`), answer-token accuracy,
and held-out loss per domain (does code/prose suffer?). The source claims +19% on
the domain task.
"""
from __future__ import annotations

import dataclasses

from moe_jax import data as data_lib
from moe_jax.config import TrainConfig, get_config
from moe_jax.train.answer_eval import answer_accuracy

from experiments import common, plots

BASE_MIX = {"code": 0.475, "prose": 0.475, "math": 0.05}
MEAN_MIX = {"code": 0.4125, "prose": 0.4125, "math": 0.175}   # the curriculum's average


def configs(quick: bool):
  model = get_config("small", d_model=96, d_expert=96, n_experts=16, top_k=2,
                     max_seq_len=128)
  data = data_lib.DataConfig(seq_len=128, batch_tokens=2048 if quick else 4096,
                             mixture=BASE_MIX)
  stage1 = TrainConfig(steps=40 if quick else 300, warmup_steps=5 if quick else 30,
                       lr=3e-3, log_every=5 if quick else 10, eval_batches=2 if quick else 4,
                       checkpoint_every=1000)
  stage2 = stage1.replace(steps=30 if quick else 200, warmup_steps=3 if quick else 20,
                          lr=1e-3)
  return model, data, stage1, stage2


def run(ctx: common.Context):
  model, data, stage1, stage2 = configs(ctx.quick)
  n_problems = 128 if ctx.quick else 512
  corpus = data_lib.corpus_from_config(data)
  problems = data_lib.problems_in(list(corpus.split("heldout")["math"]))[:n_problems]
  tokenizer = data_lib.get_tokenizer(data.tokenizer)

  def row(result, name, stage):
    r = common.run_row(result, variant=name, stage=stage)
    r.update(answer_accuracy({"params": result.state.params}, result.model, problems,
                             tokenizer))
    return r

  base = ctx.train("stage1 base", model, data, stage1)
  rows = [row(base, "stage 1 (base, 5% math)", 1)]
  # Stage 2 reads new rows (another data seed) and ends where the curriculum ends.
  stage2_data = dataclasses.replace(data, seed=data.seed + 1,
                                    curriculum_end_step=stage2.steps)
  variants = [
      ("curriculum 5%->30%", dataclasses.replace(stage2_data, mixture="curriculum")),
      ("fixed 5%", stage2_data),
      ("fixed 17.5% (same math tokens)", dataclasses.replace(stage2_data, mixture=MEAN_MIX)),
  ]
  for name, dcfg in variants:
    result = ctx.train(f"stage2 {name.split()[0]} {name.split()[1]}", model, dcfg, stage2,
                       init_params=base.state.params)
    rows.append(row(result, name, 2))
  return rows, summarise(rows, ctx, len(problems))


def summarise(rows, ctx, n_problems):
  keys = ("exact_match", "answer_token_acc", "math_loss", "code_loss", "prose_loss")
  table = [{"variant": r["variant"], **{k: r[k] for k in keys}} for r in rows]
  cur, fixed = rows[1], rows[2]
  same = rows[3]

  def rel(a, b):
    return 100.0 * (a / b - 1.0) if b else float("nan")

  text = (
      f"Math accuracy on {n_problems} held-out problems (exact match of the greedy "
      f"answer), one seed.\n\n"
      f"**Source claim: +19% on the domain task. Measured: curriculum vs fixed 5%: "
      f"exact match {cur['exact_match']:.3f} vs {fixed['exact_match']:.3f}, "
      f"answer-token accuracy {cur['answer_token_acc']:.3f} vs "
      f"{fixed['answer_token_acc']:.3f} ({rel(cur['answer_token_acc'], fixed['answer_token_acc']):+.0f}% "
      f"relative); vs the fixed mixture with the same math tokens: "
      f"{same['answer_token_acc']:.3f} ({rel(cur['answer_token_acc'], same['answer_token_acc']):+.0f}%).**")
  figs = [plots.curves([r for r in rows if r["stage"] == 2], "loss", "train cross-entropy",
                       ctx.workdir / "loss.png", "Stage 2 training loss (mixture-dependent)")]
  return {"table": table, "text": text, "plots": figs}
