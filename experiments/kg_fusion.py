"""Knowledge-graph fusion through a GAT: relational cloze on graph-only facts.

    python -m experiments.run --exp=kg_fusion            # 3 seeds x 4 rows
    python -m experiments.run --exp=kg_fusion --quick    # 1 seed x 4 rows, fewer steps

(Times: see BUILD.md.) The graph is the stdlib + plays graph of
`moe_jax.kg.extract` (a stand-in for the source's WikiData). Facts of three
relations become one-line sentences ("class X inherits from Y.", "function f is
defined in module m.", "C is a character in P."); a hash split holds out ~30% of
them: their sentences never appear in training text, their edges stay in the
graph. The same MoE LM is trained through the one loop (`moe_jax.train.loop`:
checkpoints, exact resume, logs) on the training sentences, the same rows in the
same order for every row of a seed (equal tokens), as:

  LM only                 no graph; d_expert widened to match the parameters
  LM+KG (GAT)             GAT entity embeddings injected at mentions (fusion.py)
  LM+KG shuffled graph    same, on a graph whose tails are permuted per relation
  LM+KG mean aggregation  same, GAT attention replaced by a mean over neighbours

and asked the held-out cloze questions (the prompt alone is linked): answer-token
accuracy (the headline), exact match (greedy decoding returns the answer) and the
answer's loss per relation, plus the held-out sentences' LM loss per relation
(the loop's evaluation). The source claims +8.7% on commonsense reasoning.
"""
from __future__ import annotations

import functools
import hashlib
import time

import jax
import numpy as np

from moe_jax import data as data_lib
from moe_jax.config import TrainConfig, get_config
from moe_jax.kg import batching, cloze, extract, linking
from moe_jax.kg import objective as kg_objective
from moe_jax.kg.graph import shuffle_tails
from moe_jax.models.counting import count_params
from moe_jax.train.loop import train

from experiments import common, plots

VARIANTS = [("LM only", {"kg_fusion": False}, None),
            ("LM+KG (GAT)", {}, "graph"),
            ("LM+KG shuffled graph", {}, "shuffled"),
            ("LM+KG mean aggregation", {"kg_aggregation": "mean"}, "graph")]
HELDOUT_FRACTION = 0.3
EVAL_BATCH = 64


def configs(scale: str = "default"):
  """--full (a GPU): 4x the width (the graph encoder's too), 4 layers, 3,000 steps."""
  graph_relations = len(extract.RELATIONS)
  width = common.at(scale, 64, 64, 256)
  model = get_config(
      "tiny", d_model=width, n_layers=common.at(scale, 2, 2, 4), n_heads=4, n_kv_heads=4,
      max_seq_len=64, n_dense_layers=0, n_experts=4, d_expert=width, n_shared_experts=0,
      top_k=2, n_groups=1, topk_groups=1, dispatch="dense", kg_fusion=True,
      kg_layers=(0,), kg_dim=width, kg_heads=4, kg_gat_layers=2,
      kg_relations=2 * graph_relations, kg_features=128)
  # dispatch="dense": every expert on every token, combined with the top-2 weights;
  # the same function as "dropless" (tests/test_moe.py), but at 4 experts x 64 wide
  # it compiles ~3x faster and steps ~1.6x faster on the CPU (measured side by side).
  # One fact per row: the row's subgraph is its prompt's entity and neighbours.
  data = data_lib.DataConfig(seq_len=64, batch_tokens=64 * 32)
  # ~40 epochs: the LM memorises the training facts (seen em ~0.9 at 1000 steps),
  # which is where held-out answers start to differ; 150 steps left em at 0. 900,
  # not 1000: 1000 took 20.1 min alone on 2 cores, over the 20-minute target.
  steps = common.at(scale, 100, 900, 3000)      # quick: a smoke run, em stays near 0
  train_cfg = TrainConfig(steps=steps, warmup_steps=steps // 20, lr=3e-3,
                          log_every=50, checkpoint_every=steps // 2)
  facts_per_relation = 400
  return model, data, train_cfg, facts_per_relation


# ----------------------------------------------------------------------------- data


class Task:
  """Graph, facts and their encoded rows (per graph kind), shared by every run."""

  def __init__(self, graph, per_relation: int, seq_len: int, feature_dim: int):
    self.graph = graph
    linkable = linking.EntityLinker(graph, types=("class", "function", "module",
                                                  "character", "play"))
    self.facts = cloze.select_facts(graph, set(linkable.ids), per_relation=per_relation,
                                    max_sentence_chars=seq_len)
    self.train_facts, self.heldout_facts = cloze.split_facts(self.facts, HELDOUT_FRACTION)
    self.relations = [r for r in cloze.TEMPLATES if any(f.relation == r for f in self.facts)]
    # Link exactly the entities of the task (no incidental links of template words).
    linker = linking.EntityLinker(graph, only={e for f in self.facts for e in (f.head, f.tail)})
    kw = dict(max_nodes=16, max_edges=32, neighbors=8, feature_dim=feature_dim)
    samplers = {"graph": linking.SubgraphSampler(graph, **kw),
                "shuffled": linking.SubgraphSampler(shuffle_tails(graph, 0), **kw)}
    # The "seen" probe: as many training facts as held-out ones (memorisation).
    seen = self.train_facts[::max(1, len(self.train_facts) // len(self.heldout_facts))]
    self.splits = {"train": self.train_facts, "heldout": self.heldout_facts, "seen": seen}
    self.rows = {kind: {split: batching.encode_facts(
                            facts, seq_len, linker if kind else None,
                            samplers.get(kind))
                        for split, facts in self.splits.items()}
                 for kind in (None, "graph", "shuffled")}
    self.fingerprint = hashlib.sha256("\n".join(
        f"{f.relation}\t{f.sentence}" for f in self.train_facts).encode()).hexdigest()[:16]

  def heldout_by_relation(self, kind) -> dict[str, list[dict]]:
    """The loop's held-out "domains": the held-out sentences of each relation."""
    rows = self.rows[kind]["heldout"]
    return {rel: batching.eval_batches(batching.take(rows, np.flatnonzero(
        [f.relation == rel for f in self.heldout_facts])), EVAL_BATCH)
            for rel in self.relations}


def matched_lm_config(mcfg):
  """The LM-only config whose d_expert makes its parameter count closest to the
  fused model's (count_params counts the kg parameters; total parameters equal
  within half an expert column)."""
  target = count_params(mcfg).total
  base = mcfg.replace(kg_fusion=False)
  # The count is affine in d_expert: two evaluations give the slope.
  p0 = count_params(base).total
  slope = count_params(base.replace(d_expert=mcfg.d_expert + 1)).total - p0
  return base.replace(d_expert=mcfg.d_expert + max(0, round((target - p0) / slope)))


# ----------------------------------------------------------------------------- runs


def train_variant(ctx, task: Task, name: str, mcfg, dcfg, tcfg, kind, seed: int, corpus,
                  **train_kwargs):
  """One row through the loop (resumable in ctx.run_dir); returns (RunResult, objective)."""
  tcfg = tcfg.replace(seed=seed)
  objective = kg_objective.kg_lm_objective(
      mcfg, tcfg, dcfg.seq_len,
      config={"graph": kind or "none", "facts": task.fingerprint,
              "graph_fingerprint": task.graph.fingerprint()})
  batches = batching.FactBatches(task.rows[kind]["train"], dcfg.batch_size, seed)
  result = train(mcfg, dcfg, tcfg, ctx.run_dir(f"{name}/seed{seed}"), objective=objective,
                 train_iter=batches, eval_data=task.heldout_by_relation(kind),
                 corpus=corpus, mesh=ctx.mesh, progress=ctx.progress,
                 desc=f"{name} s{seed}", **train_kwargs)
  return result


@functools.lru_cache(maxsize=8)
def _scores_fn(mcfg):
  """One compiled scorer per model config (the seeds of a row share it)."""
  return jax.jit(functools.partial(kg_objective.token_scores, mcfg=mcfg))


def cloze_scores(task: Task, result, mcfg, kind) -> dict[str, float]:
  """Answer-token accuracy, exact match and answer loss per relation (held-out and
  seen facts), from the trained state."""
  scores = _scores_fn(mcfg)
  keys = kg_objective.batch_keys(mcfg)
  out = {}
  for split in ("heldout", "seen"):
    facts = task.splits[split]
    per = {k: [] for k in ("exact", "token_acc", "answer_nll", "answer_tokens")}
    for b in batching.eval_batches(task.rows[kind][split], EVAL_BATCH):
      nll, correct = jax.device_get(scores(result.state.params, result.state.extra,
                                           {k: b[k] for k in keys}))
      m = kg_objective.cloze_metrics(nll, correct, b["answer_mask"], b["mask"])
      per["exact"].append(m["exact"])
      per["token_acc"].append(m["token_acc"])
      per["answer_nll"].append(m["answer_nll"])
      per["answer_tokens"].append(b["answer_mask"].sum(1))
    per = {k: np.concatenate(v)[:len(facts)] for k, v in per.items()}
    rels = np.array([f.relation for f in facts])
    for rel in [None] + task.relations:
      sel = np.ones(len(facts), bool) if rel is None else rels == rel
      tag = f"{split}_" if rel is None else f"{split}_{rel}_"
      out[tag + "tok"] = float(per["token_acc"][sel].mean())
      out[tag + "em"] = float(per["exact"][sel].mean())
      out[tag + "answer_loss"] = float(per["answer_nll"][sel].sum()
                                       / per["answer_tokens"][sel].sum())
  return out


def run(ctx: common.Context):
  model, data, train_cfg, per_relation = configs(ctx.scale)
  model, data, train_cfg = ctx.configs(model, data, train_cfg)
  graph = extract.stdlib_graph()
  task = Task(graph, per_relation, data.seq_len, model.kg_features)
  corpus = data_lib.corpus_from_config(data)
  lm_cfg = matched_lm_config(model)
  rows = []
  for seed in range(ctx.n_seeds(3)):
    for name, overrides, kind in VARIANTS:
      mcfg = lm_cfg if kind is None else model.replace(**overrides)
      t0 = time.perf_counter()
      result = train_variant(ctx, task, name, mcfg, data, train_cfg, kind, seed, corpus)
      row = common.run_row(result, variant=name, seed=seed)
      row.update(cloze_scores(task, result, mcfg, kind))
      row["run_s"] = time.perf_counter() - t0
      rows.append(row)
  return rows, summarise(rows, task, graph, model, lm_cfg, ctx)


def summarise(rows, task, graph, model, lm_cfg, ctx):
  relations = task.relations
  cols = (["heldout_tok"] + [f"heldout_{r}_tok" for r in relations]
          + ["heldout_em"] + [f"heldout_{r}_em" for r in relations]
          + ["heldout_answer_loss"] + [f"{r}_loss" for r in relations]
          + ["seen_tok", "seen_em"])
  table = []
  for name, _, _ in VARIANTS:
    rs = [r for r in rows if r["variant"] == name]
    entry = {"variant": name, "params": rs[0]["params_total"]}
    for c in cols:
      mean, sd = common.mean_std(rs, c)
      label = c.removeprefix("heldout_").replace("_loss", " lm_loss") \
          if c.endswith("_loss") and c != "heldout_answer_loss" else c.removeprefix("heldout_")
      entry[label] = f"{mean:.3f} ± {sd:.3f}" if len(rs) > 1 else round(mean, 4)
    table.append(entry)
  mean = {n: {c: common.mean_std([r for r in rows if r["variant"] == n], c)[0]
              for c in ("heldout_tok", "heldout_em")} for n, _, _ in VARIANTS}
  counts = {r: (sum(f.relation == r for f in task.train_facts),
                sum(f.relation == r for f in task.heldout_facts)) for r in relations}
  params = {n: [r for r in rows if r["variant"] == n][0]["params_total"] for n, _, _ in VARIANTS}
  gat, lm = mean["LM+KG (GAT)"], mean["LM only"]
  plot = plots.curves(rows, "loss", "training loss (CE per byte)",
                      ctx.workdir / "kg_fusion_loss.png", "kg_fusion: training loss")
  text = (
      f"{len(set(r['seed'] for r in rows))} seed(s), mean ± sd; "
      f"{rows[0]['configs']['train']['steps']} steps of "
      f"{rows[0]['configs']['data']['batch_tokens'] // rows[0]['configs']['data']['seq_len']}"
      f" one-fact rows per row of the table (equal tokens). Graph: {graph.summary_text()}. "
      f"Facts (train sentences / graph-only held-out): "
      + ", ".join(f"{r} {a}/{b}" for r, (a, b) in counts.items())
      + ". tok: answer-token accuracy on held-out facts (teacher-forced; the headline); "
      "em: exact match of greedy decoding; answer_loss: NLL per answer byte; "
      "<relation> lm_loss: the held-out sentences' NLL per byte (the loop's evaluation); "
      "seen_*: the same on as many training facts. Parameters (count_params, the GAT "
      f"and gates included): LM+KG {params['LM+KG (GAT)']:,}; LM only "
      f"{params['LM only']:,} (d_expert {model.d_expert} -> {lm_cfg.d_expert}, matched "
      f"capacity in the experts); mean aggregation {params['LM+KG mean aggregation']:,} "
      f"(it has no attention vectors: "
      f"{params['LM+KG (GAT)'] - params['LM+KG mean aggregation']:,} fewer, not padded).\n\n"
      f"**Source claims +8.7% on commonsense reasoning from WikiData fusion through a "
      f"GAT. Measured here, held-out answer-token accuracy: LM+KG (GAT) {gat['heldout_tok']:.3f}"
      f" vs LM only {lm['heldout_tok']:.3f} "
      f"({100 * (gat['heldout_tok'] - lm['heldout_tok']):+.1f} points); shuffled-graph "
      f"control {mean['LM+KG shuffled graph']['heldout_tok']:.3f}; mean aggregation "
      f"{mean['LM+KG mean aggregation']['heldout_tok']:.3f}. Exact match: "
      f"{gat['heldout_em']:.3f} vs {lm['heldout_em']:.3f} "
      f"({100 * (gat['heldout_em'] - lm['heldout_em']):+.1f} points).** The graph is a "
      f"stand-in for WikiData (the Python standard library and Shakespeare's casts), "
      f"and the task is relational cloze on facts seen only in the graph, not the "
      f"source's commonsense benchmarks, so the two numbers are not the same measurement.")
  return {"table": table, "text": text, "plots": [plot]}
