""""Logic distillation": rules extracted from the teacher by a decision tree.

The source names a third stage that distils the teacher's "logic" as rules found by
a decision tree, without saying what the tree sees or predicts. Our reading:

  features  x_t = [token_t, token_{t-1}, ..., token_{t-C+1},  PCA_K(h_t)]
            the last C context tokens and the first K principal components of the
            teacher's last hidden state h_t (its representation of the prefix)
  target    the teacher's decision: its greedy next token argmax z_t
  tree      sklearn DecisionTreeClassifier, fitted on teacher forwards over
            training rows of one domain (math: a small, regular "language")

Each root-to-leaf path is a readable rule ("token_t == '=' and token_{t-1} <= '9'
-> next is ' '"). A leaf that is at least `min_confidence` pure is a *confident
rule*; on the positions it covers, its class distribution becomes an extra soft
target for the student (`losses.rule_loss`). The fitted tree is exported to arrays
and evaluated inside the jitted step (`apply_rules`), so it costs a few gathers per
token. scikit-learn is needed only to fit; it is imported lazily.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class RuleTree:
  """A fitted decision tree as arrays (M nodes, V vocabulary, F features)."""
  pca_mean: jax.Array        # (D,)   teacher hidden-state mean
  pca_components: jax.Array  # (K, D) principal directions
  feature: jax.Array         # (M,) int32 feature tested at each node (0 at leaves)
  threshold: jax.Array       # (M,) f32 go left when x[feature] <= threshold
  left: jax.Array            # (M,) int32 left child, -1 at leaves
  right: jax.Array           # (M,) int32 right child, -1 at leaves
  leaf_probs: jax.Array      # (M, V) class distribution of the node's samples
  n_context: int = flax.struct.field(pytree_node=False)
  depth: int = flax.struct.field(pytree_node=False)
  min_confidence: float = flax.struct.field(pytree_node=False)
  domain: int = flax.struct.field(pytree_node=False)  # index into DataConfig.domains


def rule_features(tokens: jax.Array, hidden: jax.Array, n_context: int,
                  pca_mean: jax.Array, pca_components: jax.Array) -> jax.Array:
  """tokens (B, T) int, hidden (B, T, D) -> features (B, T, C + K) float32: the
  last C tokens (-1 before the start of the row) and the PCA projection of h_t."""
  context = [tokens]
  for lag in range(1, n_context):
    context.append(jnp.pad(tokens, ((0, 0), (lag, 0)), constant_values=-1)[:, :-lag])
  context = jnp.stack(context, axis=-1).astype(jnp.float32)            # (B, T, C)
  pcs = jnp.einsum("btd,kd->btk", hidden.astype(jnp.float32) - pca_mean,
                   pca_components)                                    # (B, T, K)
  return jnp.concatenate([context, pcs], axis=-1)


def apply_rules(tree: RuleTree, tokens: jax.Array, hidden: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Evaluate the tree in JAX. tokens (B, T), teacher hidden (B, T, D) ->
  (rule distribution (B, T, V), covered (B, T) bool: the leaf is a confident rule)."""
  x = rule_features(tokens, hidden, tree.n_context, tree.pca_mean,
                    tree.pca_components)                              # (B, T, F)
  node = jnp.zeros(tokens.shape, jnp.int32)                           # (B, T) root
  for _ in range(tree.depth):   # leaves point to themselves, so depth steps suffice
    value = jnp.take_along_axis(x, tree.feature[node][..., None], -1)[..., 0]
    child = jnp.where(value <= tree.threshold[node], tree.left[node], tree.right[node])
    node = jnp.where(tree.left[node] < 0, node, child)
  probs = tree.leaf_probs[node]                                       # (B, T, V)
  return probs, jnp.max(probs, axis=-1) >= tree.min_confidence


def _sklearn_tree():
  try:
    from sklearn.tree import DecisionTreeClassifier
  except ImportError as e:
    raise ImportError(
        "logic distillation fits a decision tree with scikit-learn, which is not "
        "installed: pip install scikit-learn (or the package's `distill` extra)") from e
  return DecisionTreeClassifier


def fit_rules(tokens: np.ndarray, hidden: np.ndarray, teacher_logits: np.ndarray,
              vocab_size: int, *, domain: int, n_context: int = 3,
              n_components: int = 8, max_depth: int = 10, min_samples_leaf: int = 16,
              min_confidence: float = 0.9, seed: int = 0
              ) -> tuple[RuleTree, Any]:
  """Fit the tree on teacher forwards: tokens (N, T), hidden (N, T, D) the teacher's
  last hidden states, teacher_logits (N, T, V). Returns (RuleTree, the sklearn tree)."""
  h = hidden.reshape(-1, hidden.shape[-1]).astype(np.float32)         # (N*T, D)
  mean = h.mean(axis=0)
  _, _, vt = np.linalg.svd(h - mean, full_matrices=False)
  components = vt[:n_components].astype(np.float32)                   # (K, D)
  x = np.asarray(rule_features(jnp.asarray(tokens), jnp.asarray(hidden), n_context,
                               jnp.asarray(mean), jnp.asarray(components)))
  x = x.reshape(-1, x.shape[-1])                                      # (N*T, F)
  y = teacher_logits.argmax(-1).reshape(-1)                           # (N*T,)
  clf = _sklearn_tree()(max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                        random_state=seed).fit(x, y)
  t = clf.tree_
  value = t.value[:, 0, :].astype(np.float64)                         # (M, classes)
  value = value / value.sum(axis=-1, keepdims=True)
  leaf_probs = np.zeros((t.node_count, vocab_size), np.float32)
  leaf_probs[:, clf.classes_] = value
  leaf = t.children_left < 0
  tree = RuleTree(
      pca_mean=jnp.asarray(mean), pca_components=jnp.asarray(components),
      feature=jnp.asarray(np.where(leaf, 0, t.feature), jnp.int32),
      threshold=jnp.asarray(t.threshold, jnp.float32),
      left=jnp.asarray(t.children_left, jnp.int32),
      right=jnp.asarray(t.children_right, jnp.int32),
      leaf_probs=jnp.asarray(leaf_probs), n_context=n_context,
      depth=int(clf.get_depth()), min_confidence=min_confidence, domain=domain)
  return tree, clf


def describe_rules(tree: RuleTree, clf, tokens: np.ndarray, hidden: np.ndarray,
                   teacher_logits: np.ndarray, decode=chr, n_examples: int = 3
                   ) -> dict[str, Any]:
  """Fidelity (agreement with the teacher's greedy token), coverage and fidelity of
  the confident rules on the given (held-out) teacher forwards, and a few rules."""
  probs, covered = jax.device_get(apply_rules(tree, jnp.asarray(tokens),
                                              jnp.asarray(hidden)))
  teacher = teacher_logits.argmax(-1)
  agree = probs.argmax(-1) == teacher
  leaves = clf.tree_.children_left < 0
  confident = leaves & (np.asarray(tree.leaf_probs).max(-1) >= tree.min_confidence)
  names = [f"tok[t-{i}]" if i else "tok[t]" for i in range(tree.n_context)] + [
      f"pc{k}" for k in range(tree.pca_components.shape[0])]
  return {"rule_leaves": int(leaves.sum()), "confident_rules": int(confident.sum()),
          "tree_fidelity": float(agree.mean()), "rule_coverage": float(covered.mean()),
          "rule_fidelity": float(agree[covered].mean()) if covered.any() else float("nan"),
          "examples": _example_rules(clf, confident, names, decode, n_examples)}


def _example_rules(clf, confident: np.ndarray, names, decode, n: int) -> list[str]:
  """The `n` confident rules with the most samples, as readable strings."""
  t = clf.tree_
  parent = {}
  for node in range(t.node_count):
    for child, op in ((t.children_left[node], "<="), (t.children_right[node], ">")):
      if child >= 0:
        parent[child] = (node, op)
  best = sorted(np.flatnonzero(confident), key=lambda m: -t.n_node_samples[m])[:n]
  rules = []
  for leaf in best:
    conditions, node = [], leaf
    while node in parent:
      node, op = parent[node]
      conditions.append(f"{names[t.feature[node]]} {op} {t.threshold[node]:.1f}")
    token = int(clf.classes_[np.argmax(t.value[leaf, 0])])
    rules.append(" and ".join(reversed(conditions)) + f" -> next {decode(token)!r} "
                 f"({t.n_node_samples[leaf]} samples)")
  return rules
