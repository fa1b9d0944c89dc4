"""Alignment, the source's third stage: constitution -> SL-CAI -> reward model -> PPO / GRPO.

    python -m experiments.run --exp=alignment            # 3 seeds (see BUILD.md for the time)
    python -m experiments.run --exp=alignment --quick    # 1 seed, a few steps
    python -m experiments.run --exp=alignment --model=small model.dtype=bfloat16  # a GPU

    base LM (pretrained through the loop, cached in the work dir)
      -> sample responses to train prompts (engine KV-cache decoder, T = 1)
      -> SL-CAI: scripted critique + revision against a violated principle, fine-tune
      -> reward model: Bradley-Terry, one head per principle, on judge-labelled pairs
         (base vs SL-CAI samples, and original vs revision), from the SL-CAI trunk
      -> RM + PPO from SL-CAI (reference = SL-CAI) at kl_coef in {0, 0.05, 0.2, 1.0}
      -> GRPO (group 4, each principle normalised within the group, kl_coef 0.2)

Every row is scored on held-out prompts (half red-team, half corpus) by sampling
one response per prompt (T = 1, the same keys for every row) and running the 12
judges: the pass rate overall (the "safety score") and per principle (p1..p12),
the reward model's score beside the judges' mean score on the same samples (reward
hacking shows as the two parting), the KL of the policy to the model it started
from (nats per response; SL-CAI: to the base; RL rows: to SL-CAI) and the held-out
LM loss per domain (the alignment tax). RL rows: mean ± sd over seeds.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import align
from moe_jax import data as data_lib
from moe_jax import sharding
from moe_jax.align import rollout as ro_lib
from moe_jax.align.batching import EOS
from moe_jax.config import ModelConfig, TrainConfig, get_config
from moe_jax.train import loop
from moe_jax.train.objective import lm_eval, variables_of

from experiments import common, plots

P, N = 32, 32                      # prompt bytes, response bytes
SOURCE_SAFETY_GAIN = 41.0          # the source's claim: +41% response-safety score
KL_COEFS = (0.0, 0.05, 0.2, 1.0)   # 0.2: the source's coefficient
SETTINGS = {   # stage sizes; quick (compile-bound): the source's KL only, <= 2 min on 2 cores
    "quick": dict(base_steps=40, slcai_steps=12, rm_steps=20, rl_steps=6, chunks=1,
                  n_train=64, n_heldout=32, rl_batch=16, group=4, kl_coefs=(0.2,)),
    "default": dict(base_steps=400, slcai_steps=120, rm_steps=160, rl_steps=48, chunks=4,
                    n_train=384, n_heldout=128, rl_batch=32, group=4, kl_coefs=KL_COEFS),
    # a GPU: 4x the width, 10x the base, 4x the RL steps at 4x the batch
    "full": dict(base_steps=4000, slcai_steps=600, rm_steps=800, rl_steps=200, chunks=8,
                 n_train=2048, n_heldout=512, rl_batch=128, group=4, kl_coefs=KL_COEFS)}


def configs(scale: str = "default", preset: str | None = None):
  width = common.at(scale, 64, 64, 256)
  model = get_config(preset, max_seq_len=P + N) if preset else get_config(
      "tiny", d_model=width, d_expert=width, n_layers=common.at(scale, 2, 2, 4), n_heads=4,
      n_kv_heads=2, d_ff=2 * width, max_seq_len=P + N, dropless_block=16)
  data = data_lib.DataConfig(seq_len=P + N,
                             batch_tokens=common.at(scale, 16, 16, 128) * (P + N),
                             max_bytes_per_domain=100_000)
  steps = SETTINGS[scale]["base_steps"]
  base = TrainConfig(steps=steps, warmup_steps=min(10, steps // 4), lr=3e-3,
                     log_every=10, eval_batches=2, checkpoint_every=10_000)
  return model, data, base


def rl_config(kl_coef: float, group: int = 4, grpo: bool = False) -> align.RLConfig:
  return align.RLConfig(kl_coef=kl_coef, response_len=N, stop_token=EOS, ppo_epochs=2,
                        group=group, per_principle=grpo, vf_coef=0.1)


@functools.lru_cache(maxsize=8)
def reward_fn(mcfg: ModelConfig, per_principle: bool):
  """The RL reward: the reward model's scores of frozen["rm"] at the response's last
  byte (the EOS is not part of the RM's layout); the mean over principles (PPO) or
  all of them (B, 12) (GRPO's per-principle normalisation). One function per
  config, so the compiled RL step is shared by seeds and KL coefficients."""
  def fn(frozen, tokens, mask):
    mask = mask * (tokens != EOS)
    scores = align.reward_scores(frozen["rm"], tokens, mask, mcfg)   # (B, 12)
    return scores if per_principle else scores.mean(-1)
  return fn


# ------------------------------------------------------------- sampling, scoring ---

def sample(variables, mcfg, prompts, batch: int, seed: int) -> np.ndarray:
  """(n, P + N) tokens: one response per prompt, in fixed-size batches (one trace)."""
  enc = align.encode_prompts(prompts, P)
  out = []
  for i, start in enumerate(range(0, len(enc), batch)):
    rows = enc[start:start + batch]
    pad = batch - len(rows)
    rows = np.concatenate([rows, np.repeat(rows[:1], pad, 0)])
    toks = ro_lib.sample_responses(variables, jnp.asarray(rows), jax.random.PRNGKey(
        seed * 1000 + i), mcfg=mcfg, n_new=N, temperature=1.0)
    out.append(np.asarray(toks)[:batch - pad])
  return np.concatenate(out)


def texts(tokens: np.ndarray) -> list[str]:
  """Response bytes up to the first EOS, decoded."""
  tok = data_lib.get_tokenizer("byte")
  out = []
  for row in tokens[:, P:]:
    stop = np.flatnonzero(row == EOS)
    out.append(tok.decode(row[:stop[0]] if stop.size else row))
  return out


@functools.partial(jax.jit, static_argnames="mcfg")
def _seq_kl(policy, reference, tokens, mcfg):
  mask = ro_lib.response_mask(tokens[:, P:], EOS)
  logp, _, _ = ro_lib.forward(policy, tokens, P, mcfg)
  logp_ref, _, _ = ro_lib.forward(reference, tokens, P, mcfg)
  return jnp.sum((logp - logp_ref) * mask, axis=1)                    # (B,) k1


@functools.partial(jax.jit, static_argnames="mcfg")
def _rm_scores(rm, tokens, mcfg):
  mask = ro_lib.full_mask(P, ro_lib.response_mask(tokens[:, P:], EOS)) * (tokens != EOS)
  return align.reward_scores(rm, tokens, mask, mcfg)


@functools.partial(jax.jit, static_argnames="mcfg")
def _lm_eval(variables, batch, mcfg):
  return lm_eval(variables, batch, mcfg)


def score(ctx_eval, variables, reference) -> tuple[dict, list[str]]:
  """The held-out metrics of one policy (see the module docstring)."""
  e = ctx_eval
  tokens = sample(variables, e["mcfg"], e["prompts"], e["batch"], seed=7)
  responses = texts(tokens)
  judge = align.score_batch(e["principles"], e["prompts"], responses)  # (n, 12)
  passed = judge >= align.PASS_THRESHOLD
  row = {"pass_rate": float(passed.mean())}
  row.update({f"p{i + 1}": float(v) for i, v in enumerate(passed.mean(0))})
  rm, kl = [], []
  for s in range(0, len(tokens), e["batch"]):
    t = tokens[s:s + e["batch"]]
    pad = e["batch"] - len(t)
    t = jnp.asarray(np.concatenate([t, np.repeat(t[:1], pad, 0)]))
    rm.append(np.asarray(_rm_scores(e["rm"], t, e["mcfg"]))[:len(t) - pad].mean(-1))
    if reference is not None:
      kl.append(np.asarray(_seq_kl(variables, reference, t, e["mcfg"]))[:len(t) - pad])
  rm = np.concatenate(rm)
  row.update(rm_score=float(rm.mean()), judge_score=float(judge.mean()),
             rm_judge_corr=float(np.corrcoef(rm, judge.mean(1))[0, 1])
             if rm.std() > 0 and judge.mean(1).std() > 0 else float("nan"),
             kl_ref=float(np.concatenate(kl).mean()) if kl else 0.0,
             response_len=float(np.mean([len(r.encode()) for r in responses])))
  results, _ = loop.evaluate(lambda v, b: _lm_eval(v, b, e["mcfg"]), variables, e["data"],
                             e["corpus"], sharding.single_device_mesh(), e["eval_batches"])
  row.update({f"{d}_loss": r["loss"] for d, r in results.items()})
  return row, responses


# --------------------------------------------------------------------- the stages ---

def run(ctx: common.Context):
  t0 = time.perf_counter()
  s = SETTINGS[ctx.scale]
  model, data, base_cfg = ctx.configs(*configs(ctx.scale, ctx.model))
  corpus = data_lib.corpus_from_config(data)
  principles = align.load_constitution()
  train_prompts = align.alignment_prompts("train", s["n_train"], seed=0, corpus=corpus)
  heldout = align.alignment_prompts("heldout", s["n_heldout"], seed=0, corpus=corpus)
  kw = dict(mesh=ctx.mesh, progress=ctx.progress, corpus=corpus)

  base = ctx.train("base", model, data, base_cfg)          # cached: resumes, evaluates
  base_params = base.state.params
  base_vars = variables_of(base_params, base.state.extra)
  # SL-CAI: revise the base model's samples, fine-tune on the revisions.
  base_train = texts(sample(base_vars, model, train_prompts, s["rl_batch"], seed=1))
  revisions = align.build_revisions(principles, train_prompts, base_train, seed=0)
  sl_cfg = base_cfg.replace(steps=s["slcai_steps"], warmup_steps=0, lr=1e-3,
                            min_lr_ratio=1.0)
  slcai = loop.train(model, data, sl_cfg, ctx.run_dir("slcai"), init_params=base_params,
                     train_iter=align.slcai_batches(revisions, data.batch_size, data.seq_len,
                                                    seed=0, prompt_len=P),
                     desc="slcai", **kw)
  sl_params = slcai.state.params
  sl_vars = variables_of(sl_params, slcai.state.extra)
  # The reward model: judge-labelled pairs, from the SL-CAI trunk.
  sl_train = texts(sample(sl_vars, model, train_prompts, s["rl_batch"], seed=2))
  pairs = (align.preference_pairs(principles, train_prompts, base_train, sl_train, seed=0)
           + align.revision_pairs(principles, train_prompts, base_train, seed=0))
  base_held = texts(sample(base_vars, model, heldout, s["rl_batch"], seed=3))
  sl_held = texts(sample(sl_vars, model, heldout, s["rl_batch"], seed=4))
  held_pairs = (align.preference_pairs(principles, heldout, base_held, sl_held, seed=1)
                + align.revision_pairs(principles, heldout, base_held, seed=1))
  rm_cfg = base_cfg.replace(steps=s["rm_steps"], warmup_steps=0, lr=1e-3, min_lr_ratio=1.0)
  rm_obj = align.reward_objective(model, rm_cfg, P + N, sl_params, len(principles))
  rm_run = loop.train(model, data, rm_cfg, ctx.run_dir("reward_model"), objective=rm_obj,
                      train_iter=align.pair_iterator(pairs, data.batch_size, P + N, seed=0,
                                                     prompt_len=P), desc="reward model", **kw)
  rm = align.reward_params(rm_run.state.params, rm_run.state.extra)
  stage_s = {"base + SL-CAI + reward model": time.perf_counter() - t0}
  rm_acc = align.pair_accuracy(rm, held_pairs, model, P + N, prompt_len=P)
  rm_train_acc = align.pair_accuracy(rm, pairs[:256], model, P + N, prompt_len=P)

  ev = dict(mcfg=model, prompts=heldout, principles=principles, rm=rm, data=data,
            corpus=corpus, batch=s["rl_batch"], eval_batches=base_cfg.eval_batches)
  rows, samples = [], {}
  for name, v, ref in (("base", base_vars, None), ("SL-CAI", sl_vars, base_vars)):
    row, samples[name] = score(ev, v, ref)
    rows.append(dict(variant=name, seed=0, **row))

  # RL from SL-CAI, reference = SL-CAI; the RM and reference are frozen inputs.
  frozen = {"reference": sl_params, "rm": rm}
  prompt_ids = align.encode_prompts(train_prompts, P)
  rl_tcfg = base_cfg.replace(steps=s["rl_steps"], warmup_steps=0, lr=1e-3, min_lr_ratio=1.0,
                             log_every=2)
  variants = ([(f"PPO kl={k:g}", "ppo", k) for k in s["kl_coefs"]]
              + [("GRPO kl=0.2", "grpo", 0.2)])
  for seed in range(ctx.n_seeds(3)):
    for name, algo, kl in variants:
      t_rl = time.perf_counter()
      grpo = algo == "grpo"
      rl = rl_config(kl, s["group"], grpo)
      tcfg = rl_tcfg.replace(seed=seed)
      batch = s["rl_batch"] // s["group"] if grpo else s["rl_batch"]
      make = align.grpo_objective if grpo else align.ppo_objective
      obj = make(model, tcfg, rl, sl_params, reward_fn(model, grpo), batch_size=batch,
                 prompt_len=P, frozen=frozen)
      workdir = ctx.run_dir(f"seed{seed}/{algo}_kl{kl:g}")
      curve = {"step": [], "pass_rate": []}
      for c in range(1, s["chunks"] + 1):     # stop / resume: held-out pass rate en route
        res = loop.train(model, data, tcfg, workdir, objective=obj, frozen=frozen,
                         train_iter=align.PromptIterator(prompt_ids, batch, seed=seed),
                         stop_at=c * s["rl_steps"] // s["chunks"], desc=name, **kw)
        v = ro_lib.policy_variables(res.state.params, res.state.extra, frozen, rl.lora)
        row, resp = score(ev, v, sl_vars)
        curve["step"].append(c * s["rl_steps"] // s["chunks"])
        curve["pass_rate"].append(row["pass_rate"])
      h = res.history
      row.update(variant=name, seed=seed, curves=dict(
          curve, log_step=[r["step"] for r in h], reward=[r["reward"] for r in h],
          kl=[r["kl"] for r in h]), configs=res.configs)
      rows.append(row)
      stage_s[name] = stage_s.get(name, 0.0) + time.perf_counter() - t_rl
      if seed == 0:
        samples[name] = resp
  summary = summarise(ctx, rows, samples, heldout, rm_acc, rm_train_acc, len(pairs),
                      len(held_pairs), time.perf_counter() - t0, stage_s)
  return rows, summary


def _ms(values) -> str:
  values = np.asarray(values, float)
  return (f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1
          else f"{values.mean():.3f}")


def summarise(ctx, rows, samples, heldout, rm_acc, rm_train_acc, n_pairs, n_held, seconds,
              stage_s):
  order = list(dict.fromkeys(r["variant"] for r in rows))
  base_pass = rows[0]["pass_rate"]
  keys = (["pass_rate"] + [f"p{i}" for i in range(1, 13)]
          + ["rm_score", "judge_score", "rm_judge_corr", "kl_ref", "response_len"]
          + [k for k in rows[0] if k.endswith("_loss")])
  table = []
  for name in order:
    rs = [r for r in rows if r["variant"] == name]
    gain = [100.0 * (r["pass_rate"] / base_pass - 1.0) for r in rs]
    t = {"variant": name, "seeds": len(rs), "safety_change_%": _ms(gain)}
    t.update({k: _ms([r[k] for r in rs]) for k in keys})
    table.append(t)
  rl_rows = [r for r in rows if "curves" in r]
  plot_paths = []
  for key, label, step in (("reward", "RM reward (rollouts)", "log_step"),
                           ("kl", "KL to reference (nats / response)", "log_step"),
                           ("pass_rate", "held-out pass rate", "step")):
    pr = [dict(variant=r["variant"], curves={"step": r["curves"][step],
                                             key: r["curves"][key]}) for r in rl_rows]
    plot_paths.append(plots.curves(pr, key, label, ctx.workdir / f"alignment_{key}.png",
                                   f"alignment: {label} over RL steps"))
  ppo02 = [r for r in rows if r["variant"] == "PPO kl=0.2"]
  ours = np.mean([100.0 * (r["pass_rate"] / base_pass - 1.0) for r in ppo02])
  lines = [f"Principles: " + ", ".join(f"p{p.id} {p.name}" for p in align.load_constitution()),
           "",
           f"Reward model: held-out pair accuracy {rm_acc:.3f} ({n_held} pairs), train "
           f"{rm_train_acc:.3f} ({n_pairs} pairs).",
           f"Safety score (held-out pass rate over the 12 principles): the source claims "
           f"+{SOURCE_SAFETY_GAIN:.0f}% after RM + PPO at KL 0.2; we measure "
           f"{ours:+.1f}% (PPO kl=0.2 vs the base, mean of {len(ppo02)} seed(s)); "
           f"base pass rate {base_pass:.3f}.",
           f"Wall time of the whole experiment: {seconds:.0f} s ("
           + ", ".join(f"{k} {v:.0f} s" for k, v in stage_s.items())
           + "; RL rows include their held-out scoring).", "",
           "Sample outputs on held-out prompts (before = base, after = SL-CAI, PPO kl=0.2, "
           "GRPO; T = 1, seed 0):", ""]
  for i in range(min(6, len(heldout))):
    lines.append(f"- prompt `{heldout[i].text!r}`")
    for name in ("base", "SL-CAI", "PPO kl=0.2", "GRPO kl=0.2"):
      if name in samples:
        lines.append(f"  - {name}: `{samples[name][i]!r}`")
  return {"table": table, "text": "\n".join(lines), "plots": plot_paths}
