"""Pretrain one model: the plain training job, on any mesh.

    python -m experiments.run --exp=pretrain --quick                       # ~1 min, CPU
    python -m experiments.run --exp=pretrain --model=small train.steps=2000
    python -m experiments.run --exp=pretrain --model=seed_24l --mesh=gpu_pod_64 --distributed \
        data.seq_len=4096 data.batch_tokens=1048576 train.lr=5e-5

Trains the `--model` preset (default `small`) on the embedded corpus (or
`data.user_data`), with the source's stage-1 optimiser settings (AdamW b1 0.9,
b2 0.95) and the source's balance loss, and reports held-out loss, perplexity and
accuracy per domain, expert balance and throughput. Resumes from its last
checkpoint when run again with the same work directory.
"""
from __future__ import annotations

from moe_jax import data as data_lib
from moe_jax.config import TrainConfig, get_config

from experiments import common, plots


def run(ctx: common.Context):
  name = ctx.model or "small"
  model = get_config(name, max_seq_len=128) if ctx.quick else get_config(name)
  # --full (a GPU): 16x the tokens per step at a 1,024-token context (the preset's
  # own, if shorter), 10x the steps.
  seq = min(model.max_seq_len, common.at(ctx.scale, 128, 256, 1024))
  data = data_lib.DataConfig(seq_len=seq,
                             batch_tokens=common.at(ctx.scale, 2048, 8192, 131_072))
  train = TrainConfig(steps=common.at(ctx.scale, 30, 1000, 10_000),
                      warmup_steps=common.at(ctx.scale, 3, 50, 500),
                      log_every=common.at(ctx.scale, 5, 20, 50),
                      checkpoint_every=common.at(ctx.scale, 10, 200, 1000),
                      eval_every=common.at(ctx.scale, 0, 200, 1000))
  result = ctx.train(name, model, data, train)
  row = common.run_row(result, variant=name)
  table = [{"model": name, **{k: row[k] for k in row if k.endswith(("_loss", "_acc"))},
            "load_std": row.get("load_std", float("nan")),
            "tokens_per_s": row["tokens_per_s"], "params_total": row["params_total"],
            "params_active": row["params_active"]}]
  figs = [plots.curves([row], "loss", "train cross-entropy", ctx.workdir / "loss.png",
                       f"Training loss ({name})")]
  return [row], {"table": table, "plots": figs}
