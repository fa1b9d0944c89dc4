"""Progressive distillation (features -> attention -> logits + rules): which stages help?

    python -m experiments.run --exp=distill_stages            # ~12 min on 2 CPU cores
    python -m experiments.run --exp=distill_stages --quick    # ~2 min
    MOE_JAX_TEACHER=/path/to/run/checkpoints python -m experiments.run --exp=distill_stages

Teacher: the small MoE LM of balance_ablation (4 layers, d_model 96, 16 experts top-2),
trained here on the code/prose/math corpus; its orbax checkpoint is cached in
`<workdir>/teacher/checkpoints` and reused on later runs (MOE_JAX_TEACHER points at
another run's checkpoints instead). Student: dense, 2 layers, d_model 64
(`student_config`); student layer i learns from teacher layer (i+1)*Lt/Ls - 1.

Every row trains the student for the same number of steps (same tokens, same data
order); a row's stages split that budget equally, each with its own lr, warm-up and
cosine decay, each starting from the previous stage's student:
  1 features   CE + ||h_s W - h_t||^2 at mapped layers (TinyBERT)
  2 attention  CE + KL(A_t || A_s) at mapped layers, teacher heads averaged in groups
               onto student heads (MiniLM)
  3 logits     0.5 CE + 0.5 tau^2 KL(p_t^tau || p_s^tau), tau = 2, + rules
"Logic distillation" (our reading, moe_jax/distill/rules.py): a decision tree is fitted
on teacher forwards over math training rows, features = the last 3 tokens and 8
principal components of the teacher's last hidden state, target = the teacher's
greedy next token. Its confident leaves (>= 90% pure) are rules; on math tokens a rule
covers, the leaf's distribution is an extra soft target in stage 3 (weight 0.5). The
row "1+2+3 without rules" measures whether it helps; the summary reports the tree's
fidelity to the teacher, its coverage, and the top rules.

Columns: held-out loss and next-token accuracy per domain; quality as % of the teacher
(accuracy-based: mean accuracy student / teacher; perplexity-based: teacher ppl /
student ppl, ppl = exp(mean held-out loss)); total parameters; generation throughput
student / teacher (jitted greedy decode through the serving engine's KV cache,
interleaved timing; the cache-free ratio is printed next to it). The source claims the
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

# Loss weights of the three stages (the row's step budget and lr are set in `rows`).
FEATURE = dict(name="1 features", feature=1.0, lr=3e-3)
ATTENTION = dict(name="2 attention", attention=1.0, lr=3e-3)
LOGITS = dict(name="3 logits+rules", ce=0.5, logit=0.5, rules=0.5, lr=2e-3)
VARIANTS = [  # (row, stages); "scratch" is CE only
    ("scratch (CE only)", [dict(name="scratch", lr=3e-3)]),
    ("logits only", [dict(LOGITS, name="3 logits", rules=0.0)]),
    ("1+2+3 progressive", [FEATURE, ATTENTION, LOGITS]),
    ("1+2+3 without rules", [FEATURE, ATTENTION, dict(LOGITS, name="3 logits", rules=0.0)]),
    ("without 1 (2+3)", [ATTENTION, LOGITS]),
    ("without 2 (1+3)", [FEATURE, LOGITS]),
    ("without 3 (1+2)", [FEATURE, ATTENTION]),
]
FULL, SCRATCH, LOGITS_ONLY, NO_RULES = VARIANTS[2][0], VARIANTS[0][0], VARIANTS[1][0], \
    VARIANTS[3][0]


def configs(quick: bool):
  teacher = get_config("small", d_model=96, d_expert=96, n_experts=16, top_k=2,
                       max_seq_len=128)
  data = data_lib.DataConfig(seq_len=128, batch_tokens=2048 if quick else 4096)
  train = TrainConfig(steps=60 if quick else 300, warmup_steps=5 if quick else 30,
                      lr=3e-3, log_every=5 if quick else 10, eval_batches=2 if quick else 4,
                      checkpoint_every=1000)
  return teacher, data, train


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


def run(ctx: common.Context):
  teacher_cfg, data, train = ctx.configs(*configs(ctx.quick))
  student_cfg = student_config(teacher_cfg)
  corpus = data_lib.corpus_from_config(data)
  teacher_vars, teacher_path = _teacher(ctx, teacher_cfg, data, train)
  tree, rule_info = _rules(teacher_vars, teacher_cfg, data, corpus, ctx.quick)
  budget = max(3, train.steps * 3 // 4)             # student steps of every row
  init = distill.init_student(student_cfg, data.seq_len, seed=train.seed)

  common_kw = dict(student_cfg=student_cfg, teacher_variables=teacher_vars,
                   teacher_cfg=teacher_cfg, dcfg=data, base_tcfg=train, rules=tree,
                   corpus=corpus, progress=ctx.progress)
  done: dict[tuple, tuple] = {}   # stage prefix -> (params, history, data state, run configs)
  rows = []
  for variant, stage_specs in VARIANTS:
    steps = budget // len(stage_specs)
    stages = [distill.StageConfig(steps=steps, warmup_steps=min(train.warmup_steps, steps // 5),
                                  **spec) for spec in stage_specs]
    # Rows that share their first stages reuse them (same data order, same result).
    # Each stage is one run of the training loop in its own directory (resumable).
    params, history, data_state, stage_configs = init, [], None, []
    for k, stage in enumerate(stages):
      key = tuple(stages[:k + 1])
      if key not in done:
        run_dir = ctx.run_dir("students/" + "+".join(f"{s.name}x{s.steps}" for s in key))
        result = distill.run_stage(params, stage, data_state=data_state, workdir=run_dir,
                                   **common_kw)
        curve = [dict(h, global_step=h["step"] + k * steps) for h in result.history]
        done[key] = (result.params, history + curve, result.data_state,
                     stage_configs + [result.run.configs])
      params, history, data_state, stage_configs = done[key]
    evals = distill.evaluate_model({"params": params}, student_cfg, data, corpus,
                                   train.eval_batches)
    rows.append(_row(variant, evals, student_cfg, history, stages))
    rows[-1]["configs"] = stage_configs
    if variant == FULL:
      full_params = params
  teacher_eval = distill.evaluate_model(teacher_vars, teacher_cfg, data, corpus,
                                        train.eval_batches)
  rows.append(_row("teacher", teacher_eval, teacher_cfg, [], []))
  speed = _throughput(teacher_vars, teacher_cfg, full_params, student_cfg, ctx.quick)
  return rows, summarise(rows, ctx, speed, rule_info, teacher_path, budget, data)


def _row(variant, evals, cfg, history, stages):
  row = {"variant": variant}
  for domain, r in evals.items():
    row[f"{domain}_loss"] = r["loss"]
    row[f"{domain}_acc"] = r["accuracy"]
  row["val_loss"] = float(np.mean([r["loss"] for r in evals.values()]))
  row["val_acc"] = float(np.mean([r["accuracy"] for r in evals.values()]))
  row["params_total"] = count_params(cfg).total
  row["params_active"] = count_params(cfg).active
  row["stages"] = [s.name for s in stages]
  row["curves"] = {"step": [h["global_step"] for h in history],
                   "loss": [h["ce"] for h in history]}
  return row


def _throughput(teacher_vars, teacher_cfg, student_params, student_cfg, quick):
  """Student and teacher decode the same prompts, interleaved: with the serving
  engine's KV cache (the speed column) and, for comparison, by full recomputation."""
  prompt = jnp.tile(jnp.arange(16, dtype=jnp.int32)[None] + 65, (8, 1))      # (8, 16)
  models = {"teacher": (teacher_vars, teacher_cfg),
            "student": ({"params": student_params}, student_cfg)}
  out = {}
  for cache, tag in ((True, ""), (False, "_nocache")):
    tps = distill.generation_throughput(models, prompt, n_new=16 if quick else 48,
                                        rounds=3 if quick else 5, cache=cache)
    out.update({f"teacher_tok_s{tag}": tps["teacher"], f"student_tok_s{tag}": tps["student"],
                f"speedup{tag}": tps["student"] / tps["teacher"]})
  return out


def speed_only() -> dict[str, float]:
  """The speed column alone, without training: freshly initialised teacher and
  student of the full run's configs (decode time does not depend on the weights)."""
  teacher_cfg = configs(False)[0]
  student_cfg = student_config(teacher_cfg)

  def init(cfg):
    return nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 8), jnp.int32)))
  return _throughput(init(teacher_cfg), teacher_cfg, init(student_cfg)["params"],
                     student_cfg, quick=False)


def summarise(rows, ctx, speed, rule_info, teacher_path, budget, data):
  teacher = rows[-1]
  table = []
  for r in rows:
    entry = {"variant": r["variant"]}
    for domain in data.domains:
      entry[f"{domain}_loss"] = r[f"{domain}_loss"]
      entry[f"{domain}_acc"] = r[f"{domain}_acc"]
    entry["quality_acc_%"] = 100.0 * r["val_acc"] / teacher["val_acc"]
    entry["quality_ppl_%"] = 100.0 * float(np.exp(teacher["val_loss"] - r["val_loss"]))
    entry["params"] = r["params_total"]
    entry["speedup"] = 1.0 if r is teacher else speed["speedup"]
    table.append(entry)
  by = {t["variant"]: t for t in table}
  full, scratch, logit, no_rules = by[FULL], by[SCRATCH], by[LOGITS_ONLY], by[NO_RULES]
  examples = "\n".join(f"  - `{e}`" for e in rule_info["examples"])
  text = (
      f"Teacher checkpoint: `{teacher_path}`. Every student row: {budget} steps of "
      f"{data.batch_tokens} tokens; one seed. Quality = student/teacher mean held-out "
      f"next-token accuracy (acc) or teacher/student perplexity (ppl); speedup = "
      f"student/teacher greedy-decode tokens/s with a KV cache "
      f"({speed['student_tok_s']:,.0f} vs {speed['teacher_tok_s']:,.0f}; without a "
      f"cache {speed['speedup_nocache']:.1f}x).\n\n"
      f"**Source claim: the student keeps 92% of the teacher's quality at 22x the "
      f"speed. Measured: 1+2+3 keeps {full['quality_acc_%']:.1f}% (accuracy) / "
      f"{full['quality_ppl_%']:.1f}% (perplexity) with "
      f"{full['params'] / teacher['params_total']:.2f}x the parameters, at "
      f"{speed['speedup']:.1f}x the generation speed.** From scratch: "
      f"{scratch['quality_acc_%']:.1f}% / {scratch['quality_ppl_%']:.1f}%; logits only: "
      f"{logit['quality_acc_%']:.1f}% / {logit['quality_ppl_%']:.1f}%.\n\n"
      f"Logic distillation: the tree has {rule_info['rule_leaves']} leaves, "
      f"{rule_info['confident_rules']} confident rules; on held-out math it agrees with "
      f"the teacher's greedy token {100 * rule_info['tree_fidelity']:.0f}% of the time, "
      f"its confident rules cover {100 * rule_info['rule_coverage']:.0f}% of tokens with "
      f"{100 * rule_info['rule_fidelity']:.0f}% agreement. With rules vs without: math "
      f"accuracy {full['math_acc']:.4f} vs {no_rules['math_acc']:.4f}, mean quality "
      f"{full['quality_acc_%']:.1f}% vs {no_rules['quality_acc_%']:.1f}%. Top rules:\n"
      f"{examples}")
  figs = [plots.curves([r for r in rows if r["curves"]["loss"]], "loss",
                       "train cross-entropy (student)", ctx.workdir / "loss.png",
                       "Student training loss across stages")]
  return {"table": table, "text": text, "plots": figs}
