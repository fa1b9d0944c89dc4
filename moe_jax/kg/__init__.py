"""Knowledge-graph fusion (issue 14): a graph from the embedded corpus, a GAT, and
its injection into the MoE LM at entity mentions.

  graph.py     KnowledgeGraph, user triples (TSV / JSONL)
  extract.py   the built-in graph: stdlib modules/classes/functions + plays (cached)
  gat.py       graph attention network over edge lists (segment softmax)
  fusion.py    the gated injection module the Transformer calls (config.kg_fusion)
  linking.py   entity mentions in text -> token positions; padded subgraph batches
  cloze.py     graph facts as cloze sentences; the train / graph-only split
  batching.py  facts -> fused rows; FactBatches, the loop's resumable iterator
  objective.py the LM objective with kg batch keys; cloze metrics

Only the light modules are imported here (the Transformer imports fusion.py).
"""
from moe_jax.kg.graph import KnowledgeGraph, from_triples, load_triples  # noqa: F401
