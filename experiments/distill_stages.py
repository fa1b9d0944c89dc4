"""Progressive distillation (features -> attention -> logits + rules): which stages help?

    python -m experiments.run --exp=distill_stages            # BUILD.md has the time
    python -m experiments.run --exp=distill_stages --quick    # a smoke run, 1 seed
    MOE_JAX_TEACHER=/path/to/run/checkpoints python -m experiments.run --exp=distill_stages

    teacher (trained once, cached)          6 student rows x 3 seeds (one run each)
    MoE 4L d96 16e top-2                    dense 2L d64 (or MoE 2L d64 16e)
    600 steps x 4,096 tokens                120 steps x 2,048 tokens: 1/10 of the
          |  frozen, in every student step  teacher's tokens, as a student distilled
          `---------------------------->    from a model trained on far more data
                                            row = stages sharing ONE AdamW state and ONE
                                            lr schedule; a stage switch changes only the
                                            loss weights (moe_jax/distill/stages.py)

Teacher: the small MoE LM of balance_ablation (4 layers, d_model 96, 16 experts top-2),
trained here on the code/prose/math corpus; its orbax
checkpoint is cached in `<workdir>/teacher/checkpoints` and reused on later runs
(MOE_JAX_TEACHER points at another run's checkpoints instead). Student: dense, 2
layers, d_model 64 (`student_config`); student layer i learns from teacher layer
(i+1)*Lt/Ls - 1. The MoE student is the same with 16 experts top-2 in both layers.

Every student row trains for the same steps on the same tokens (per seed: the same
data order and initialisation in every row); the stages of a row split its steps
equally, under one warm-up + cosine schedule over the whole row:
  1 features   CE + ||h_s W - h_t||^2 at mapped layers (TinyBERT)
  2 attention  CE + KL(A_t || A_s) at mapped layers, teacher heads averaged in groups
               onto student heads (MiniLM)
  3 logits     0.5 CE + 0.5 tau^2 KL(p_t^tau || p_s^tau), tau = 2, + 0.5 rules
"Logic distillation" (our reading, moe_jax/distill/rules.py): a decision tree is fitted
on teacher forwards over math training rows, features = the last 3 tokens and 8
principal components of the teacher's last hidden state, target = the teacher's
greedy next token. Its confident leaves (>= 90% pure) are rules; on math tokens a rule
covers, the leaf's distribution is an extra soft target in stage 3.

Rows (6, x 3 seeds): scratch (CE only), logits only, 1+2+3 progressive, 1+2+3 without
rules, and the MoE student with 1+2+3 and from scratch. The leave-one-stage-out rows
of earlier versions (2+3, 1+3, 1+2) are dropped to fit the 20-minute budget on two
CPU cores with three seeds; `VARIANTS` lists them commented out.

Columns: held-out next-token accuracy per domain and its mean (mean ± sd over seeds);
quality as % of the teacher (accuracy: mean accuracy student / teacher; perplexity:
teacher ppl / student ppl, ppl = exp(mean held-out loss)); code completion: exact
match of the greedy 8-token completion at line starts of held-out code, after the
indentation (moe_jax/distill/completion.py); total parameters; generation
throughput student / teacher (the serving engine's KV-cache greedy decode,
interleaved timing; the cache-free ratio is in the text). The source claims the
student keeps 92% of the teacher's quality at 22x the speed.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import data as data_lib
from moe_jax import distill
from moe_jax.config import ModelConfig, TrainConfig, get_config
from moe_jax.models.counting import count_params
from moe_jax.models.transformer import Transformer

from experiments import common, plots

# Loss weights of the three stages (a row's steps, lr and schedule: `configs`).
SCRATCH_STAGE = dict(name="scratch")
FEATURE = dict(name="1 features", feature=1.0)
ATTENTION = dict(name="2 attention", attention=1.0)
LOGITS = dict(name="3 logits+rules", ce=0.5, logit=0.5, rules=0.5)
NO_RULE_LOGITS = dict(LOGITS, name="3 logits", rules=0.0)
VARIANTS = [  # (row, stages, MoE student)
    ("scratch (CE only)", [SCRATCH_STAGE], False),
    ("logits only", [NO_RULE_LOGITS], False),
    ("1+2+3 progressive", [FEATURE, ATTENTION, LOGITS], False),
    ("1+2+3 without rules", [FEATURE, ATTENTION, NO_RULE_LOGITS], False),
    ("MoE student 1+2+3", [FEATURE, ATTENTION, LOGITS], True),
    ("MoE student scratch", [SCRATCH_STAGE], True),
    # Dropped for time (one more row costs ~1/6 of the students' time):
    # ("without 1 (2+3)", [ATTENTION, LOGITS], False),
    # ("without 2 (1+3)", [FEATURE, LOGITS], False),
    # ("without 3 (1+2)", [FEATURE, ATTENTION], False),
]
SCRATCH, LOGITS_ONLY, FULL, NO_RULES, MOE_FULL, MOE_SCRATCH = (v[0] for v in VARIANTS)
COMPLETION = dict(prompt_len=48, n_new=8)          # code completion: prompt, tokens
# A student row trains 1/5 of the teacher's steps at half its batch: 1/10 of its
# tokens (a student learns from a teacher trained on far more data).
STUDENT_STEPS, STUDENT_BATCH = 1 / 5, 1 / 2


def configs(scale: str = "default"):
  """(teacher model, data, teacher train config); `student_train` derives the
  students' from the last. --quick halves the depth (2-layer teacher, 1-layer
  students): its time is compiling, and the layers are unrolled. --full (a GPU): a
  teacher 4x as wide and twice as deep, 16x the tokens per step, 5x the steps."""
  width = common.at(scale, 96, 96, 384)
  teacher = get_config("small", d_model=width, d_expert=width, n_experts=16, top_k=2,
                       max_seq_len=common.at(scale, 128, 128, 512),
                       n_layers=common.at(scale, 2, 4, 8))
  data = data_lib.DataConfig(seq_len=teacher.max_seq_len,
                             batch_tokens=common.at(scale, 2048, 4096, 65_536))
  train = TrainConfig(steps=common.at(scale, 60, 600, 3000),
                      warmup_steps=common.at(scale, 5, 30, 150), lr=3e-3,
                      log_every=common.at(scale, 5, 25, 50),
                      eval_batches=common.at(scale, 2, 4, 8), checkpoint_every=1000)
  return teacher, data, train


def student_train(train: TrainConfig, data: data_lib.DataConfig
                  ) -> tuple[TrainConfig, data_lib.DataConfig]:
  """The students' train and data configs: STUDENT_STEPS of the teacher's steps
  (>= 3: one per stage) with 10% warm-up, STUDENT_BATCH of its batch."""
  steps = max(3, round(train.steps * STUDENT_STEPS))
  batch = max(data.seq_len, round(data.batch_tokens * STUDENT_BATCH) // data.seq_len
              * data.seq_len)
  return (train.replace(steps=steps, warmup_steps=max(1, steps // 10),
                        log_every=max(1, min(train.log_every, steps // 12))),
          data.replace(batch_tokens=batch))


def student_config(teacher: ModelConfig, moe: bool = False) -> ModelConfig:
  """Half the layers, 2/3 the width (a multiple of 16), dense unless `moe`."""
  d_model = max(16, (2 * teacher.d_model // 3) // 16 * 16)
  n_layers = max(1, teacher.n_layers // 2)
  heads = teacher.n_heads if d_model % teacher.n_heads == 0 else 2
  return teacher.replace(d_model=d_model, n_layers=n_layers, n_heads=heads,
                         n_kv_heads=heads, d_ff=4 * d_model, d_expert=d_model,
                         n_dense_layers=0 if moe else n_layers, sharing="none")


def _teacher(ctx, teacher_cfg, data, train):
  given = os.environ.get("MOE_JAX_TEACHER")
  if given:
    return distill.load_teacher(given, teacher_cfg, train, data.seq_len), given
  result = ctx.train("teacher", teacher_cfg, data, train)
  path = ctx.workdir / "teacher" / "checkpoints"
  variables = distill.load_teacher(path, teacher_cfg, train, data.seq_len)
  # The restored checkpoint is the trained teacher, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, variables["params"], result.state.params)
  return variables, str(path)


def _rules(teacher_vars, teacher_cfg, data, corpus, quick):
  """Fit the decision tree on teacher forwards over math rows; describe it on
  held-out math rows."""
  tokenizer = data_lib.get_tokenizer(data.tokenizer)

  @jax.jit
  def forward(tokens):
    logits, aux = Transformer(teacher_cfg).apply(teacher_vars, tokens, return_hidden=True)
    return logits, aux["hidden"][-1]

  def teacher_on(split, n_rows):
    rows = data_lib.packed_rows(corpus, "math", split, tokenizer, data.seq_len)
    tokens = np.asarray(rows[:n_rows, :-1])
    outs = [jax.device_get(forward(tokens[i:i + 16])) for i in range(0, len(tokens), 16)]
    return tokens, np.concatenate([o[1] for o in outs]), np.concatenate([o[0] for o in outs])

  fit_tokens, fit_hidden, fit_logits = teacher_on("train", 64 if quick else 256)
  tree, clf = distill.fit_rules(fit_tokens, fit_hidden, fit_logits, teacher_cfg.vocab_size,
                                domain=data.domains.index("math"))
  info = distill.describe_rules(tree, clf, *teacher_on("heldout", 32),
                                decode=lambda t: tokenizer.decode([t]))
  return tree, info


def _completion_set(data, corpus, quick):
  tokenizer = data_lib.get_tokenizer(data.tokenizer)
  rows = data_lib.packed_rows(corpus, "code", "heldout", tokenizer, data.seq_len)
  # Short rows (overridden seq_len) shorten the prompt to half a row.
  kw = dict(COMPLETION, prompt_len=min(COMPLETION["prompt_len"], data.seq_len // 2))
  return distill.completion_prompts(rows, max_prompts=64 if quick else 256, **kw)


def run(ctx: common.Context):
  teacher_cfg, data, train = ctx.configs(*configs(ctx.scale))
  student_tcfg, student_data = student_train(train, data)
  cfgs = {False: student_config(teacher_cfg), True: student_config(teacher_cfg, moe=True)}
  corpus = data_lib.corpus_from_config(data)
  teacher_vars, teacher_path = _teacher(ctx, teacher_cfg, data, train)
  tree, rule_info = _rules(teacher_vars, teacher_cfg, data, corpus, ctx.quick)
  prompts, refs = _completion_set(data, corpus, ctx.quick)
  budget = student_tcfg.steps

  def scores(variables, cfg):
    evals = distill.evaluate_model(variables, cfg, data, corpus, train.eval_batches)
    return evals, distill.code_completion(variables, cfg, prompts, refs)

  teacher_scores = scores(teacher_vars, teacher_cfg)
  rows, last_params = [], {}
  for seed in range(ctx.n_seeds(3)):
    # Per seed: one initialisation per student config and one data order, shared by
    # every row; the same compiled step serves every row and seed of a config.
    seed_data = student_data.replace(seed=data.seed + seed)
    inits = {moe: distill.init_student(cfg, data.seq_len, seed=seed)
             for moe, cfg in cfgs.items()}
    for variant, specs, moe in VARIANTS:
      n = len(specs)
      stages = [distill.StageConfig(steps=budget // n + (k < budget % n), **spec)
                for k, spec in enumerate(specs)]
      result = distill.run_stages(
          inits[moe], stages, student_cfg=cfgs[moe], teacher_variables=teacher_vars,
          teacher_cfg=teacher_cfg, dcfg=seed_data, tcfg=student_tcfg.replace(seed=seed),
          rules=tree, corpus=corpus, progress=ctx.progress,
          workdir=ctx.run_dir(f"students/seed{seed}/{variant}"))
      params = result.state.params["student"]
      rows.append(_row(variant, seed, *scores({"params": params}, cfgs[moe]), cfgs[moe],
                       result.history, stages))
      rows[-1]["configs"] = result.configs
      last_params[moe] = params
  speed = _throughput(teacher_vars, teacher_cfg, {moe: ({"params": p}, cfgs[moe])
                                                  for moe, p in last_params.items()},
                      ctx.quick)
  for seed in range(ctx.n_seeds(3)):
    rows.append(_row("teacher", seed, *teacher_scores, teacher_cfg, [], []))
  return rows, summarise(rows, ctx, speed, rule_info, teacher_path, (train, data),
                         (student_tcfg, student_data))


def _row(variant, seed, evals, completion, cfg, history, stages):
  row = {"variant": variant, "seed": seed, "moe": cfg.n_dense_layers < cfg.n_layers}
  for domain, r in evals.items():
    row[f"{domain}_loss"] = r["loss"]
    row[f"{domain}_acc"] = r["accuracy"]
  row["val_loss"] = float(np.mean([r["loss"] for r in evals.values()]))
  row["val_acc"] = float(np.mean([r["accuracy"] for r in evals.values()]))
  row["completion_exact_%"] = 100 * completion["exact"]
  row["completion_prefix_%"] = 100 * completion["prefix"]
  row["params_total"] = count_params(cfg).total
  row["params_active"] = count_params(cfg).active
  row["stages"] = [s.name for s in stages]
  row["curves"] = {"step": [h["step"] for h in history], "loss": [h["ce"] for h in history],
                   "lr": [h["lr"] for h in history]}
  return row


def _throughput(teacher_vars, teacher_cfg, students, quick):
  """Students and teacher decode the same prompts, interleaved: with the serving
  engine's KV cache (the speed column) and, in the full run, by full recomputation.
  students: {moe: (variables, cfg)}."""
  prompt = jnp.tile(jnp.arange(16, dtype=jnp.int32)[None] + 65, (8, 1))      # (8, 16)
  models = {"teacher": (teacher_vars, teacher_cfg),
            **{f"student{'_moe' if moe else ''}": v for moe, v in students.items()}}
  out = {}
  for cache, tag in ((True, ""),) + (() if quick else ((False, "_nocache"),)):
    tps = distill.generation_throughput(models, prompt, n_new=16 if quick else 48,
                                        rounds=3 if quick else 5, cache=cache)
    for name, v in tps.items():
      out[f"{name}_tok_s{tag}"] = v
      if name != "teacher":
        out[f"speedup{name[7:]}{tag}"] = v / tps["teacher"]
  return out


def speed_only() -> dict[str, float]:
  """The speed column alone, without training: freshly initialised teacher and
  students of the full run's configs (decode time does not depend on the weights)."""
  teacher_cfg = configs()[0]
  def init(cfg):
    return nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 8), jnp.int32)))
  return _throughput(init(teacher_cfg), teacher_cfg,
                     {moe: (init(student_config(teacher_cfg, moe)),
                            student_config(teacher_cfg, moe)) for moe in (False, True)},
                     quick=False)


def _per_seed_table(rows, speed):
  """Quality and speed per seed: each student run against the teacher."""
  teacher = next(r for r in rows if r["variant"] == "teacher")
  for r in rows:
    r["quality_acc_%"] = 100.0 * r["val_acc"] / teacher["val_acc"]
    r["quality_ppl_%"] = 100.0 * float(np.exp(teacher["val_loss"] - r["val_loss"]))
    r["speedup"] = 1.0 if r["variant"] == "teacher" else \
        speed["speedup_moe" if r["moe"] else "speedup"]


COLUMNS = ("code_acc", "prose_acc", "math_acc", "val_loss", "quality_acc_%",
           "quality_ppl_%", "completion_exact_%", "completion_prefix_%")


def summarise(rows, ctx, speed, rule_info, teacher_path, teacher_run, student_run):
  """teacher_run, student_run: (TrainConfig, DataConfig) of the teacher, students."""
  (train, data), (student_tcfg, student_data) = teacher_run, student_run
  _per_seed_table(rows, speed)
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  by = {v: [r for r in rows if r["variant"] == v] for v in variants}
  table = []
  for v in variants:
    entry = {"variant": v, "seeds": len(by[v])}
    for col in COLUMNS:
      digits = 4 if col.endswith("_acc") else 3 if col == "val_loss" else 1
      entry[col] = common.pm([r[col] for r in by[v]], digits)
    entry["params"] = by[v][0]["params_total"]
    entry["speedup"] = round(by[v][0]["speedup"], 2)
    table.append(entry)

  def mean(v, col):
    return float(np.mean([r[col] for r in by[v]]))

  def cell(v, col):
    return common.pm([r[col] for r in by[v]], 1)
  n_seeds = len(by["teacher"])
  margin = [t["val_acc"] - s["val_acc"] for t, s in zip(by["teacher"], by[SCRATCH])]
  teacher = by["teacher"][0]
  ratio = (train.steps * data.batch_tokens) / (student_tcfg.steps *
                                                student_data.batch_tokens)
  examples = "\n".join(f"  - `{e}`" for e in rule_info["examples"])
  text = (
      f"Teacher checkpoint: `{teacher_path}` ({train.steps} steps of {data.batch_tokens:,} "
      f"tokens, trained once). Every student row: {student_tcfg.steps} steps of "
      f"{student_data.batch_tokens:,} tokens ({ratio:.1f}x fewer than the teacher: a student "
      f"learns from a teacher trained on far more data), one warm-up + cosine lr "
      f"schedule (peak {student_tcfg.lr:g}) and one AdamW state across its stages "
      f"(a stage switch changes only the loss weights); {n_seeds} seed(s) (student "
      f"initialisation and data order), mean ± sd. Quality = student/teacher mean "
      f"held-out next-token accuracy (acc) or teacher/student perplexity (ppl); code "
      f"completion = exact match of {COMPLETION['n_new']} greedy tokens after the "
      f"indentation of a held-out code line (prefix: matched leading tokens / "
      f"{COMPLETION['n_new']}), teacher {teacher['completion_exact_%']:.1f}% / "
      f"{teacher['completion_prefix_%']:.1f}%; speedup = student/teacher greedy-decode "
      f"tokens/s with a KV cache (dense {speed['student_tok_s']:,.0f}, MoE "
      f"{speed['student_moe_tok_s']:,.0f}, teacher {speed['teacher_tok_s']:,.0f}"
      + (f"; without a cache dense {speed['speedup_nocache']:.1f}x" if
         "speedup_nocache" in speed else "") + ").\n\n"
      f"The teacher beats the student trained from scratch by "
      f"{common.pm(margin, 4)} mean held-out accuracy (scratch keeps "
      f"{cell(SCRATCH, 'quality_acc_%')}% of it).\n\n"
      f"**Source claim: the student keeps 92% of the teacher's quality at 22x the "
      f"speed. Measured: 1+2+3 keeps {cell(FULL, 'quality_acc_%')}% (accuracy) / "
      f"{cell(FULL, 'quality_ppl_%')}% (perplexity) with "
      f"{by[FULL][0]['params_total'] / teacher['params_total']:.2f}x the parameters, at "
      f"{speed['speedup']:.1f}x the generation speed; code completion "
      f"{cell(FULL, 'completion_exact_%')}% exact vs the teacher's "
      f"{teacher['completion_exact_%']:.1f}%.** From scratch: "
      f"{cell(SCRATCH, 'quality_acc_%')}% / {cell(SCRATCH, 'quality_ppl_%')}%; logits "
      f"only: {cell(LOGITS_ONLY, 'quality_acc_%')}% / {cell(LOGITS_ONLY, 'quality_ppl_%')}%. "
      f"MoE student ({by[MOE_FULL][0]['params_total'] / teacher['params_total']:.2f}x "
      f"the parameters, {speed['speedup_moe']:.1f}x the speed): 1+2+3 "
      f"{cell(MOE_FULL, 'quality_acc_%')}%, from scratch "
      f"{cell(MOE_SCRATCH, 'quality_acc_%')}%.\n\n"
      f"Logic distillation: the tree has {rule_info['rule_leaves']} leaves, "
      f"{rule_info['confident_rules']} confident rules; on held-out math it agrees with "
      f"the teacher's greedy token {100 * rule_info['tree_fidelity']:.0f}% of the time, "
      f"its confident rules cover {100 * rule_info['rule_coverage']:.0f}% of tokens with "
      f"{100 * rule_info['rule_fidelity']:.0f}% agreement. With rules vs without: math "
      f"accuracy {mean(FULL, 'math_acc'):.4f} vs {mean(NO_RULES, 'math_acc'):.4f}, mean "
      f"quality {cell(FULL, 'quality_acc_%')}% vs {cell(NO_RULES, 'quality_acc_%')}%. "
      f"Top rules:\n{examples}")
  figs = [plots.curves([r for r in rows if r["curves"]["loss"]], "loss",
                       "train cross-entropy (student)", ctx.workdir / "loss.png",
                       "Student training loss (mean over seeds)")]
  return {"table": table, "text": text, "plots": figs}
