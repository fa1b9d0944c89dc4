"""An independent PTQ reference: weight-only int8 / int4 with Google's qwix.

    fwd, qparams, info = qwix_ptq(model_cfg, params, "int8")
    logits, aux = fwd(qparams, tokens)          # or {"router_bias": ...} via `extra`

qwix intercepts jnp.einsum / jnp.dot / lax.dot_general on parameters and quantizes the
weight operand per output channel (symmetric absmax; scales over every non-contracted
axis). The rules match the matrices our own PTQ quantizes: attention wq/wk/wv/wo,
dense and shared-expert MLPs, and the routed experts; the embedding (a gather plus the
tied output head), norms and router stay fp32. The model runs with dispatch="dense"
(the same function as dropless: every token through every expert, combined with the
router weights) because the dropless path builds per-tile weights with a one-hot
einsum over experts, where qwix would share one scale across all experts.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.models.transformer import Transformer

# Module paths (qwix: '/'-joined, matched with re.fullmatch) of the quantized matrices.
MODULES = r"(.*/)?(attn|mlp|moe|shared_experts)"
QTYPES = ("int8", "int4")


def _qwix():
  try:
    import qwix  # noqa: PLC0415 - optional dependency
  except ImportError as e:                                      # pragma: no cover
    raise ImportError("the qwix reference rows need qwix: pip install qwix "
                      "(or pip install -e '.[quant]')") from e
  return qwix


def _is_quantized(leaf) -> bool:
  """A quantized weight as `qwix.quantize_params` returns it: a wrapper whose `.array`
  is a public `qwix.QArray` (qvalue, scale, zero_point). Duck-typed on the public
  class so that nothing depends on qwix's private `_src` modules."""
  import qwix  # noqa: PLC0415
  return isinstance(getattr(leaf, "array", None), qwix.QArray)


def qwix_ptq(model_cfg: ModelConfig, params, qtype: str, seq_len: int | None = None):
  """Weight-only PTQ of `params` with qwix. Returns (forward, qparams, info):
  forward(qparams, tokens, extra=None) -> (logits, aux) (jit-able; `extra` holds other
  variable collections, e.g. {"router_bias": ...}); info has `quantized` (param paths),
  `bits_per_weight` (values only, as storage.weight_bits) and `bits_with_scales`."""
  if qtype not in QTYPES:
    raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
  qwix = _qwix()
  cfg = model_cfg.replace(dispatch="dense")
  rules = [qwix.QuantizationRule(module_path=MODULES, weight_qtype=qtype)]
  model = qwix.quantize_model(Transformer(cfg), qwix.PtqProvider(rules))
  tokens = jnp.zeros((1, seq_len or min(cfg.max_seq_len, 16)), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  qparams = qwix.quantize_params(params, variables["params"])

  is_q = _is_quantized
  quantized, values = [], 0
  bits = scale_bits = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_q)[0]:
    if is_q(leaf):
      quantized.append("/".join(str(getattr(k, "key", k)) for k in path))
      n = int(np.prod(leaf.array.qvalue.shape))
      values += n
      bits += n * jnp.iinfo(jnp.dtype(qtype)).bits
      scale_bits += sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize * 8
                        for a in (leaf.array.scale, leaf.array.zero_point) if a is not None)
  info = {"quantized": quantized,
          "bits_per_weight": bits / values if values else 32.0,
          "bits_with_scales": (bits + scale_bits) / values if values else 32.0}

  def forward(qp, tokens, extra: dict[str, Any] | None = None):
    return model.apply({"params": qp, **(extra or {})}, tokens)

  return forward, qparams, info
