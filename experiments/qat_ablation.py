"""QAT ablation: variance-grouped mixed 8/4-bit weights, PTQ vs QAT, a random-channel
control at equal bits, and inference from the quantized weights.

    python -m experiments.run --exp=qat_ablation            # 3 seeds; BUILD.md has the time
    python -m experiments.run --exp=qat_ablation --quick    # a smoke run: 1 layer, 1 seed

    fp32 base (seed s) ─┬─ PTQ: int8 | int4 | int3 | mixed 8/4, 8/3 (variance | random channels)
                        ├─ fine-tune fp32 (control) | QAT mixed: fixed, dynamic, random groups
                        └─ each row: stored (int8 / packed int4, orbax), reloaded, held-out loss

Trains a small MoE LM (8 experts, top-2, 2 layers, d=128) in full precision, long
enough that 4- and 3-bit weights cost measurable quality, then quantizes every
attention, MLP and expert matrix (embeddings, norms and the router stay fp32):
uniform int8 symmetric, int4 and int3 asymmetric, and the source's mixed scheme (per
matrix and per expert, the 30% of output channels with the highest variance 8-bit
symmetric, the rest 4- or 3-bit asymmetric) as PTQ. The control for the variance
rule keeps the same 30% of channels at 8 bits, drawn at random (equal bits,
`QuantConfig(grouping="random")`). Then QAT: the mixed scheme fine-tunes the trained
model for a fifth of the base steps with fake quantization and the clipped STE, the
channel groups fixed at the start, recomputed every REGROUP_EVERY steps, or random;
an fp32 model fine-tuned for the same steps is the control the QAT rows are compared
with, so extra training is not mistaken for a quantization gain. Each row is converted
to real storage, reloaded, and evaluated on held-out text per domain through the
dequantizing forward (bit-identical to the fake-quantized one); seed 0 also through the
integer forward (int8 activations, int32 accumulation), timed against fp32 side by
side, and against Google's qwix. Three seeds, mean ± sd, paired per seed. Source
claims: within 1.2% of FP16 quality, 2.8x faster inference.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from moe_jax import data as data_lib
from moe_jax import losses, sharding
from moe_jax.config import TrainConfig, get_config
from moe_jax.models.transformer import Transformer
from moe_jax.quant import QuantConfig, inference, qat, qwix_reference, storage
from moe_jax.train.loop import evaluate

from experiments import common, plots

MIXED = QuantConfig()                                  # 8-bit sym / 4-bit asym, q=0.7
RANDOM = MIXED.replace(grouping="random")              # the control: same bits, random channels
SCHEMES = {"int8": QuantConfig(scheme="all_high"), "int4": QuantConfig(scheme="all_low"),
           "mixed": MIXED}
# PTQ of the trained fp32 model: (row name, config, speed label). At 3 bits the low
# group's error is large enough for the choice of the 8-bit channels to show; the
# random rows keep the same number of channels at 8 bits (equal bits per weight).
PTQ = (("int8 PTQ", SCHEMES["int8"], "int8"), ("int4 PTQ", SCHEMES["int4"], "int4"),
       ("mixed PTQ", MIXED, "mixed"), ("mixed PTQ random channels", RANDOM, "-"),
       ("int3 PTQ", QuantConfig(scheme="all_low", low_bits=3), "-"),
       ("mixed 8/3 PTQ", QuantConfig(low_bits=3), "-"),
       ("mixed 8/3 PTQ random channels", RANDOM.replace(low_bits=3), "-"))
REGROUP_EVERY = 5
CONTROL = "fp32 fine-tuned (control)"
QAT = ((CONTROL, None, 0), ("mixed QAT fixed groups", MIXED, 0),
       ("mixed QAT dynamic groups", MIXED, REGROUP_EVERY),
       ("mixed QAT random groups", RANDOM, 0))
# (variance rule, its random-channel control at equal bits)
PAIRS = (("mixed PTQ", "mixed PTQ random channels"),
         ("mixed 8/3 PTQ", "mixed 8/3 PTQ random channels"),
         ("mixed QAT fixed groups", "mixed QAT random groups"))
QWIX_QTYPES = ("int8", "int4")       # independent reference rows (Google's qwix)
SOURCE_QUALITY_PCT, SOURCE_SPEEDUP = 1.2, 2.8


def configs(scale: str = "default"):
  """A base trained long enough that 4- and 3-bit weights cost measurable quality.
  --quick is a smoke run of every row at one layer: its time is compiling (the layers
  are unrolled, and each storage layout compiles its own evaluation). --full (a GPU):
  4x the width, 4 layers, 16x the tokens per step, 10x the steps."""
  width = common.at(scale, 128, 128, 512)
  model = get_config("small", d_model=width, d_expert=width, n_experts=8, top_k=2,
                     n_layers=common.at(scale, 1, 2, 4),
                     max_seq_len=common.at(scale, 128, 128, 512))
  data = data_lib.DataConfig(seq_len=model.max_seq_len,
                             batch_tokens=common.at(scale, 2048, 4096, 65_536),
                             max_bytes_per_domain=common.at(scale, 1_000_000, 4_000_000,
                                                            None))
  train = TrainConfig(steps=common.at(scale, 30, 300, 3000),
                      warmup_steps=common.at(scale, 3, 30, 150), lr=3e-3,
                      log_every=common.at(scale, 5, 25, 50),
                      eval_batches=common.at(scale, 2, 4, 8), checkpoint_every=1000)
  return model, data, train


def qat_config(train: TrainConfig) -> TrainConfig:
  """Fine-tuning: a fifth of the base steps at a tenth of its learning rate."""
  steps = max(2, train.steps // 5)
  return train.replace(steps=steps, warmup_steps=max(1, steps // 10), lr=train.lr / 10,
                       log_every=max(1, min(train.log_every, steps)))


def seeded(qcfg: QuantConfig | None, seed: int) -> QuantConfig | None:
  """The random control draws other channels for each seed."""
  return qcfg.replace(grouping_seed=seed) if qcfg and qcfg.grouping == "random" else qcfg


@functools.lru_cache(maxsize=8)
def _eval_fn(mcfg, integer: bool):
  """One jitted eval per (model, path), shared by every row and seed: the weights and
  the router bias are arguments, so a seed's rows reuse the first seed's executables."""
  @jax.jit
  def eval_fn(state, batch):
    qparams, router_bias = state
    if integer:
      logits = inference.forward(qparams, batch["inputs"], mcfg, router_bias)
    else:
      params = storage.dequantize_params(qparams)
      bias = {"router_bias": router_bias} if router_bias else {}
      logits, _ = Transformer(mcfg).apply({"params": params, **bias}, batch["inputs"])
    n = batch["targets"].size
    ce, acc = losses.cross_entropy(logits, batch["targets"])
    return {"nll_sum": ce * n, "correct": acc * n, "tokens": np.float32(n)}
  return eval_fn


def measure_row(ctx, name, tree, mcfg, data, train, router_bias, corpus, seed,
                integer=True, **labels):
  """Size on disk, bits per weight, held-out loss per domain (dequant and, with
  `integer`, the integer forward)."""
  path = ctx.workdir / f"seed{seed}" / name.replace(" ", "_").replace("/", "-") / "weights"
  disk = storage.save(path, tree)
  tree = storage.load(path)                 # evaluate what was stored
  mesh = sharding.single_device_mesh()
  row = dict(variant=name, seed=seed, **labels, bits_per_weight=storage.weight_bits(tree),
             disk_kb=disk / 1024, payload_kb=storage.payload_bytes(tree) / 1024)
  res, _ = evaluate(_eval_fn(mcfg, False), (tree, router_bias), data, corpus, mesh,
                    train.eval_batches)
  for domain, r in res.items():
    row[f"{domain}_loss"], row[f"{domain}_ppl"] = r["loss"], r["perplexity"]
  row["val_loss"] = float(np.mean([r["loss"] for r in res.values()]))
  quantized = any(storage.is_qtensor(t)
                  for t in jax.tree.leaves(tree, is_leaf=storage.is_qtensor))
  if integer and quantized:
    res_int, _ = evaluate(_eval_fn(mcfg, True), (tree, router_bias), data, corpus, mesh,
                          train.eval_batches)
    row["val_loss_int"] = float(np.mean([r["loss"] for r in res_int.values()]))
  return row


def run(ctx: common.Context):
  model, data, train = ctx.configs(*configs(ctx.scale))
  corpus = data_lib.corpus_from_config(data)
  qat_train = qat_config(train)
  rows, qwix_info, speed = [], {}, {}
  for seed in range(ctx.n_seeds(default=3)):
    first = seed == 0
    seed_data, seed_train = data.replace(seed=seed), train.replace(seed=seed)
    fp = ctx.train(f"fp32 seed{seed}", model, seed_data, seed_train, corpus=corpus)
    params, router_bias = fp.state.params, fp.state.router_bias
    measure = functools.partial(measure_row, ctx, mcfg=model, data=data, train=train,
                                corpus=corpus, seed=seed, integer=first)
    seed_rows = [dict(measure("fp32", params, router_bias=router_bias, ref="-",
                              scheme="fp32"), configs=fp.configs)]
    for name, qcfg, scheme in PTQ:
      seed_rows.append(measure(name, storage.quantize_params(params, seeded(qcfg, seed)),
                               router_bias=router_bias, ref="fp32", scheme=scheme))
    if first:
      for qtype in QWIX_QTYPES:
        row, info = qwix_row(qtype, params, model, data, train, router_bias, corpus)
        if row:
          seed_rows.append(dict(row, seed=seed))
          qwix_info[qtype] = info
      speed = throughput(params, model, router_bias, data, ctx.quick)

    # QAT: fine-tune the trained model on the rows after the base's; the fp32 control
    # gets the same steps and rows.
    for name, qcfg, every in QAT:
      qcfg = seeded(qcfg, seed)
      print(f"{name} seed {seed}: {qat_train.steps} steps")
      p, rb, groups, result = qat.finetune(
          params, router_bias, model, seed_data, qat_train.replace(seed=seed), qcfg,
          regroup_every=every, corpus=corpus, workdir=ctx.run_dir(f"{name} seed{seed}"),
          progress=ctx.progress, desc=name, data_state=fp.data_state)
      tree = p if qcfg is None else storage.quantize_params(p, qcfg, groups)
      scheme = "fp32" if qcfg is None else "mixed" if qcfg.grouping == "variance" else "-"
      row = measure(name, tree, router_bias=rb, ref="-" if qcfg is None else CONTROL,
                    scheme=scheme)
      history = result.history
      regroups = sum(h.get("regroup_count", 0.0) for h in history)
      if regroups:
        row["regrouped_%"] = sum(h["regrouped_pct_count"] for h in history) / regroups
      row["curves"] = {"step": [h["step"] for h in history],
                       "loss": [h["ce"] for h in history]}
      row["configs"] = result.configs
      seed_rows.append(row)
    by_name = {r["variant"]: r for r in seed_rows}
    for r in seed_rows:                      # paired with the same seed's reference
      ref = by_name.get(r["ref"])
      r["loss_delta"] = r["val_loss"] - ref["val_loss"] if ref else 0.0
      r["loss_change_%"] = 100.0 * r["loss_delta"] / ref["val_loss"] if ref else 0.0
    rows += seed_rows
  return rows, summarise(rows, speed, ctx, qwix_info)


def qwix_row(qtype, params, mcfg, data, train, router_bias, corpus):
  """Independent reference: weight-only PTQ with Google's qwix, evaluated like the PTQ
  rows (held-out loss per domain). Not saved: qwix's tree is not our storage format.
  Returns (None, {}) when qwix is not installed."""
  try:
    forward, qparams, info = qwix_reference.qwix_ptq(mcfg, params, qtype, data.seq_len)
  except ImportError as e:
    print(f"qwix {qtype}: skipped ({e})")
    return None, {}
  extra = {"router_bias": router_bias} if router_bias else {}

  @jax.jit
  def eval_fn(qp, batch):
    logits, _ = forward(qp, batch["inputs"], extra)
    n = batch["targets"].size
    ce, acc = losses.cross_entropy(logits, batch["targets"])
    return {"nll_sum": ce * n, "correct": acc * n, "tokens": np.float32(n)}

  res, _ = evaluate(eval_fn, qparams, data, corpus, sharding.single_device_mesh(),
                    train.eval_batches)
  row = dict(variant=f"qwix {qtype}", ref="fp32", scheme=f"qwix {qtype}",
             bits_per_weight=info["bits_per_weight"],
             bits_with_scales=info["bits_with_scales"], disk_kb=float("nan"),
             payload_kb=float("nan"), qwix_quantized=len(info["quantized"]))
  for domain, r in res.items():
    row[f"{domain}_loss"], row[f"{domain}_ppl"] = r["loss"], r["perplexity"]
  row["val_loss"] = float(np.mean([r["loss"] for r in res.values()]))
  return row, info


def throughput(params, mcfg, router_bias, data, quick=False):
  """Prefill tokens/s of fp32, and of each scheme's dequant and integer forward (--quick:
  the mixed scheme's only, one of each code path). The weights are arguments of the
  jitted functions, as in serving (not constants)."""
  bias = {"router_bias": router_bias} if router_bias else {}
  fp = jax.jit(lambda p, t: Transformer(mcfg).apply({"params": p, **bias}, t)[0])
  dequant = jax.jit(lambda qp, t: Transformer(mcfg).apply(
      {"params": storage.dequantize_params(qp), **bias}, t)[0])
  integer = jax.jit(lambda qp, t: inference.forward(qp, t, mcfg, router_bias))
  fns = {"fp32": functools.partial(fp, params)}
  for scheme, qcfg in SCHEMES.items():
    if quick and scheme != "mixed":
      continue
    qp = storage.quantize_params(params, qcfg)
    fns[f"{scheme} dequant"] = functools.partial(dequant, qp)
    fns[f"{scheme} integer"] = functools.partial(integer, qp)
  tokens = jax.numpy.zeros((max(1, data.batch_size // 2), data.seq_len), jax.numpy.int32)
  return inference.compare_throughput(fns, tokens)


def _qwix_text(t, info) -> str:
  if set(info or ()) != set(QWIX_QTYPES):
    return ("The qwix reference rows were not run (qwix is not installed: "
            "pip install qwix).")
  return (
      f"**Independent reference (Google's qwix, weight-only PTQ, seed 0): qwix int8 "
      f"{t['qwix int8']['loss_change_%']}%, qwix int4 "
      f"{t['qwix int4']['loss_change_%']}% vs fp32.** qwix quantized "
      f"{len(info['int8']['quantized'])} matrices, the same set as our PTQ: every "
      f"attention, MLP and routed-expert matrix (experts with their own scales); the "
      f"embedding, norms and router stay fp32. It quantizes symmetrically (absmax) per "
      f"output channel, so its int4 is symmetric where ours is asymmetric; it runs the "
      f"experts through the dense dispatch (the same function as dropless), since "
      f"the dropless one-hot tile einsum would share scales across experts. Its size on "
      f"disk is not measured (`disk_kb` NaN: qwix's tree is not our storage format); "
      f"bits/weight counts values only, "
      f"{info['int4']['bits_per_weight']:.0f} or {info['int8']['bits_per_weight']:.0f} "
      f"(with its fp32 scales: {info['int4']['bits_with_scales']:.2f} / "
      f"{info['int8']['bits_with_scales']:.2f}).")


def summarise(rows, speed, ctx, qwix_info=None):
  names = list(dict.fromkeys(r["variant"] for r in rows))
  domains = [k[:-5] for k in rows[0] if k.endswith("_loss") and k != "val_loss"]
  runs = {n: [r for r in rows if r["variant"] == n] for n in names}
  table = []
  for name in names:
    rs = runs[name]
    first = rs[0]
    entry = {"variant": name, "bits/weight": first["bits_per_weight"],
             "disk_kb": first["disk_kb"]}
    for d in domains:
      entry[f"{d}_ppl"] = float(np.mean([r[f"{d}_ppl"] for r in rs]))
    entry["val_loss"] = common.pm([r["val_loss"] for r in rs])
    entry["delta_nats"] = common.pm([r["loss_delta"] for r in rs], 4, sign=True)
    entry["loss_change_%"] = common.pm([r["loss_change_%"] for r in rs], 2, sign=True)
    entry["vs"] = first["ref"]
    entry["seeds"] = len(rs)
    if "val_loss_int" in first:
      entry["val_loss_int8_act"] = first["val_loss_int"]
    s = first["scheme"]
    if s == "fp32" and speed:
      entry["tok/s"] = speed["fp32"]
    elif f"{s} dequant" in speed:
      entry["speed_dequant_x"] = speed[f"{s} dequant"] / speed["fp32"]
      entry["speed_integer_x"] = speed[f"{s} integer"] / speed["fp32"]
    table.append(entry)
  t = {e["variant"]: e for e in table}
  n = len(runs["fp32"])
  noise = common.pm([r["val_loss"] for r in runs["fp32"]], 4)

  def paired(a, b):           # per seed: b's loss minus a's (positive: b is worse)
    by_seed = {r["seed"]: r["val_loss"] for r in runs[a]}
    return common.pm([r["val_loss"] - by_seed[r["seed"]] for r in runs[b]], 4, sign=True)
  grouping = "; ".join(f"{b.replace(' random channels', '').replace(' random groups', '')}"
                       f" {paired(a, b)} nats" for a, b in PAIRS)
  dyn = runs["mixed QAT dynamic groups"]
  moved = common.pm([r.get("regrouped_%", 0.0) for r in dyn], 1)
  cfg = runs["fp32"][0]["configs"]
  tokens = cfg["train"]["steps"] * cfg["data"]["batch_tokens"]
  qat_steps = runs[CONTROL][0]["configs"]["train"]["steps"]
  text = (
      f"Loss = held-out next-byte cross-entropy (nats), mean over domains, mean ± sd "
      f"over {n} seed(s) (base training, data order; the random control draws other "
      f"channels per seed). `delta_nats` and `loss_change_%` are paired per seed with "
      f"the row named in `vs` (PTQ rows: that seed's trained fp32 model; QAT rows: its "
      f"fp32 model fine-tuned for the same steps). Equal tokens: every base model trains "
      f"{cfg['train']['steps']} steps of {cfg['data']['batch_tokens']:,} tokens "
      f"({tokens:,}); every QAT row and the control fine-tune {qat_steps} steps of the "
      f"same batch size. `val_loss_int8_act` (seed 0) is the integer forward (int8 "
      f"activations per token, int32 accumulation). `disk_kb` is the orbax checkpoint "
      f"(fp32 embeddings, norms and router included); bits/weight counts the quantized "
      f"matrices' values only.\n\n"
      f"**Can the base show a cost? Seed-to-seed sd of the fp32 loss: {noise} nats; "
      f"int4 PTQ costs {t['int4 PTQ']['delta_nats']} nats "
      f"({t['int4 PTQ']['loss_change_%']}%), int3 PTQ {t['int3 PTQ']['delta_nats']} "
      f"nats ({t['int3 PTQ']['loss_change_%']}%), paired.**\n\n"
      f"**Source claim: within {SOURCE_QUALITY_PCT}% of full precision. Measured: mixed "
      f"8/4 PTQ {t['mixed PTQ']['loss_change_%']}%, mixed QAT fixed groups "
      f"{t['mixed QAT fixed groups']['loss_change_%']}%, dynamic groups "
      f"{t['mixed QAT dynamic groups']['loss_change_%']}% (int8 PTQ "
      f"{t['int8 PTQ']['loss_change_%']}%, int4 PTQ {t['int4 PTQ']['loss_change_%']}%; "
      f"at 3 bits: uniform {t['int3 PTQ']['loss_change_%']}%, mixed 8/3 "
      f"{t['mixed 8/3 PTQ']['loss_change_%']}%).**\n\n"
      f"**Does choosing the 8-bit channels by variance matter? Random channels at equal "
      f"bits minus the variance rule, paired per seed (positive: variance is better): "
      f"{grouping}.** Dynamic regrouping every {REGROUP_EVERY} steps moved {moved}% of "
      f"channels per regrouping; dynamic minus fixed groups "
      f"{paired('mixed QAT fixed groups', 'mixed QAT dynamic groups')} nats.\n\n"
      + _speed_text(speed) + "\n\n" + _qwix_text(t, qwix_info))
  figs = [plots.curves([r for r in rows if "curves" in r], "loss",
                       "train cross-entropy (fake-quantized forward)",
                       ctx.workdir / "qat_loss.png", "QAT fine-tuning, mean over seeds")]
  return {"table": table, "text": text, "plots": figs}


def _speed_text(speed) -> str:
  if not speed:
    return "Speed not measured."
  best = max(v / speed["fp32"] for k, v in speed.items() if k != "fp32")
  ratios = ", ".join(f"{k} {v / speed['fp32']:.2f}x" for k, v in speed.items()
                     if k != "fp32")
  return (
      f"**Source claim: {SOURCE_SPEEDUP}x faster inference. Measured on this CPU (seed "
      f"0): {ratios} (best {best:.2f}x) against fp32 at {speed['fp32']:,.0f} tokens/s, "
      f"prefill batch, timed side by side.** A CPU cannot show the speed-up: XLA:CPU has "
      f"no fast int8 or int4 matmul kernels, so the integer matmul and the unpacking or "
      f"dequantization are extra work, and a model this small is compute- not "
      f"memory-bound. The source's gain comes from int8/int4 tensor cores and 2-4x "
      f"less weight traffic on an accelerator; `benchmarks/quant_inference.py` measures "
      f"the same forwards on a GPU when one is lent.")
