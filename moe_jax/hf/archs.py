"""Supported Hugging Face architectures: config.json <-> ModelConfig, tensors <-> params.

    HF name (per layer i)                         moe_jax parameter
    input_layernorm                               attn_i/norm/scale
    self_attn.{q,k,v}_proj (.weight, .bias)       attn_i/attn/w{q,k,v} (D, N, H), b{q,k,v}
    self_attn.{q,k}_norm                          attn_i/attn/{q,k}_norm/scale      (Qwen3)
    self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj   attn_i/attn/wq | wq_a, q_norm, wq (MLA)
    self_attn.kv_a_proj_with_mqa = [c_kv ; k_rope] attn_i/attn/wkv_a, wk_rope          (MLA)
    self_attn.kv_b_proj = per head [k_nope ; v]   attn_i/attn/wk_b, wv_b               (MLA)
    self_attn.o_proj                              attn_i/attn/wo (N, H, D)
    post_attention_layernorm                      {dense,moe}_ffn_j/norm/scale
    mlp.{gate,up,down}_proj                       dense_ffn_j/mlp/w_{gate,up,down}
    <moe>.gate.weight, .e_score_correction_bias   moe_ffn_j/moe/router/kernel, router_bias
    <moe>.experts.e.{gate,up,down}_proj           moe_ffn_j/moe/w_{gate,up,down}[e]  (Mixtral: w1, w3, w2)
    mlp.shared_expert(s).*, shared_expert_gate    moe_ffn_j/moe/shared_experts/*, shared_gate

torch Linear weights are (out, in); ours are (in, ...), so every matrix is transposed.
DeepSeek stores rotary dimensions as interleaved pairs (x0, x1), (x2, x3)...; our
rotary is rotate-half. Permuting the rope rows of the query and key projections
(evens first, then odds) makes rotate-half compute exactly the interleaved rotation,
and q.k is unchanged because both sides are permuted alike; export applies the
inverse permutation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.models.sharing import make_plan
from moe_jax.models.transformer import moe_layer_sets

ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}


class UnsupportedModelError(ValueError):
  """The checkpoint's architecture, or one of its settings, is not supported."""


def architecture_of(hf: dict[str, Any]) -> str:
  """'mixtral' | 'qwen2_moe' | 'qwen3_moe' | 'deepseek_v2' | 'deepseek_v3'."""
  archs = hf.get("architectures") or []
  for a in archs:
    if a in ARCHITECTURES:
      return ARCHITECTURES[a]
  raise UnsupportedModelError(
      f"unsupported architecture {archs or hf.get('model_type')!r} in config.json; "
      f"supported: {sorted(ARCHITECTURES)}")


def _rope(hf: dict[str, Any], arch: str) -> dict[str, Any]:
  """ModelConfig rope fields from rope_parameters (transformers 5) or rope_theta +
  rope_scaling (older config.json files)."""
  rope = dict(hf.get("rope_scaling") or {})
  rope.update(hf.get("rope_parameters") or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  if kind in ("default", None):
    return out
  if kind != "yarn" or not arch.startswith("deepseek"):
    raise UnsupportedModelError(
        f"config.json rope scaling {kind!r} is not supported for {arch} (supported: "
        f"plain RoPE; yarn for DeepSeek)")
  _unsupported_if(rope.get("attention_factor") is not None, "yarn attention_factor")
  _unsupported_if(not rope.get("truncate", True), "yarn truncate=False")
  original = rope["original_max_position_embeddings"]
  factor = rope.get("factor") or hf["max_position_embeddings"] / original
  return {**out, "rope_scaling": "yarn", "rope_factor": float(factor),
          "rope_original_max_len": int(original),
          "yarn_beta_fast": float(rope.get("beta_fast") or 32),
          "yarn_beta_slow": float(rope.get("beta_slow") or 1),
          "yarn_mscale": float(rope.get("mscale") or 0),
          "yarn_mscale_all_dim": float(rope.get("mscale_all_dim") or 0)}


def _first(hf: dict[str, Any], *keys: str):
  """The first of `keys` present (transformers renames some across versions)."""
  for k in keys:
    if hf.get(k) is not None:
      return hf[k]
  raise UnsupportedModelError(f"config.json has none of {list(keys)}")


def _unsupported_if(cond: bool, what: str) -> None:
  if cond:
    raise UnsupportedModelError(f"config.json: {what} is not supported")


def to_model_config(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
  """The ModelConfig of a HF config.json dict (raises UnsupportedModelError)."""
  arch = architecture_of(hf)
  dtype = dtype or {"bfloat16": "bfloat16", "float16": "float16"}.get(
      hf.get("dtype", hf.get("torch_dtype")), "float32")
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  _unsupported_if(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r}")
  _unsupported_if(bool(hf.get("quantization_config")), "a quantized checkpoint "
                  "(quantization_config)")
  kw: dict[str, Any] = dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
      n_heads=n, n_kv_heads=hf.get("num_key_value_heads") or n,
      max_seq_len=hf.get("max_position_embeddings", 4096), **_rope(hf, arch),
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      top_k=hf["num_experts_per_tok"], dtype=dtype, param_dtype=dtype)
  if arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
    head_dim = hf.get("head_dim") or d // n
    kw.update(head_dim=0 if head_dim * n == d else head_dim, score_func="softmax")
    _unsupported_if(hf.get("sliding_window") is not None and hf.get(
        "use_sliding_window", arch == "mixtral"), "sliding-window attention")
  if arch == "mixtral":
    e, f = _first(hf, "num_local_experts", "num_experts"), hf["intermediate_size"]
    kw.update(n_experts=e, d_expert=f, d_ff=f, norm_topk_prob=True)
  elif arch in ("qwen2_moe", "qwen3_moe"):
    _unsupported_if(hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"),
                    "dense layers between MoE layers (decoder_sparse_step, mlp_only_layers)")
    f = hf["moe_intermediate_size"]
    kw.update(n_experts=_first(hf, "num_experts", "num_local_experts"), d_expert=f, d_ff=hf.get("intermediate_size", f),
              norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    if arch == "qwen2_moe":
      shared = hf.get("shared_expert_intermediate_size", 0)
      _unsupported_if(shared % f != 0, f"shared_expert_intermediate_size={shared} not a "
                      f"multiple of moe_intermediate_size={f}")
      kw.update(qkv_bias=bool(hf.get("qkv_bias", True)), n_shared_experts=shared // f,
                shared_expert_gate=shared > 0)
    else:
      _unsupported_if(bool(hf.get("attention_bias")), "attention_bias=True")
      kw.update(qk_norm=True)
  else:  # deepseek_v2 / deepseek_v3
    _unsupported_if(bool(hf.get("attention_bias")), "attention_bias=True")
    _unsupported_if(hf.get("moe_layer_freq", 1) != 1, "moe_layer_freq != 1")
    _unsupported_if(bool(hf.get("mlp_bias")), "mlp_bias=True")
    e = _first(hf, "n_routed_experts", "num_local_experts", "num_experts")
    kw.update(attention="mla", n_kv_heads=n, q_lora_rank=hf.get("q_lora_rank") or 0,
              kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
              qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
              n_dense_layers=hf.get("first_k_dense_replace", 0), d_ff=hf["intermediate_size"],
              n_experts=e, d_expert=hf["moe_intermediate_size"],
              n_shared_experts=hf.get("n_shared_experts") or 0,
              route_scale=float(hf.get("routed_scaling_factor", 1.0)))
    if arch == "deepseek_v2":
      method = hf.get("topk_method", "greedy")
      _unsupported_if(method not in ("greedy", "group_limited_greedy"),
                      f"topk_method={method!r}")
      groups = (hf["n_group"], hf["topk_group"]) if method != "greedy" else (1, 1)
      # transformers' DeepseekV2 never renormalises the top-k weights.
      kw.update(score_func="softmax", n_groups=groups[0], topk_groups=groups[1])
    else:
      kw.update(score_func="sigmoid", router_bias=True, n_groups=hf.get("n_group") or 1,
                topk_groups=hf.get("topk_group") or 1,
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)))
  return ModelConfig(**kw)


def to_hf_config(c: ModelConfig, arch: str, base: dict[str, Any] | None = None) -> dict:
  """config.json for `c` as `arch`, over `base` (the imported config.json, whose other
  keys such as token ids are kept)."""
  if arch not in MODEL_TYPES:
    raise UnsupportedModelError(f"cannot export to {arch!r}; supported: {sorted(MODEL_TYPES)}")
  hf = dict(base or {})
  hf.update(architectures=[MODEL_TYPES[arch]], model_type=arch, vocab_size=c.vocab_size,
            hidden_size=c.d_model, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
            tie_word_embeddings=c.tie_embeddings, num_experts_per_tok=c.top_k,
            hidden_act="silu", dtype=c.param_dtype,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
  if c.rope_scaling == "yarn":
    hf["rope_parameters"].update(
        rope_type="yarn", factor=c.rope_factor,
        original_max_position_embeddings=c.rope_original_max_len,
        beta_fast=c.yarn_beta_fast, beta_slow=c.yarn_beta_slow,
        mscale=c.yarn_mscale, mscale_all_dim=c.yarn_mscale_all_dim)
  hf.pop("rope_scaling", None)
  hf.pop("torch_dtype", None)
  if c.attention == "gqa":
    hf["head_dim"] = c.resolved_head_dim
  if arch == "mixtral":
    hf.update(num_local_experts=c.n_experts, intermediate_size=c.d_expert)
  elif arch in ("qwen2_moe", "qwen3_moe"):
    hf.update(num_experts=c.n_experts, moe_intermediate_size=c.d_expert,
              intermediate_size=c.d_ff, norm_topk_prob=c.norm_topk_prob,
              decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "qwen2_moe":
      hf.update(qkv_bias=c.qkv_bias,
                shared_expert_intermediate_size=c.n_shared_experts * c.d_expert)
  else:
    hf.update(q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank,
              qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
              v_head_dim=c.v_head_dim, first_k_dense_replace=c.n_dense_layers,
              intermediate_size=c.d_ff, n_routed_experts=c.n_experts,
              moe_intermediate_size=c.d_expert, n_shared_experts=c.n_shared_experts,
              routed_scaling_factor=c.route_scale, n_group=c.n_groups,
              topk_group=c.topk_groups, norm_topk_prob=c.norm_topk_prob, moe_layer_freq=1,
              attention_bias=False)
    if arch == "deepseek_v2":
      hf["topk_method"] = "group_limited_greedy" if c.n_groups > 1 else "greedy"
    else:
      hf["rope_interleave"] = hf.get("rope_interleave", True)
  return hf


# ---------------------------------------------------------------------------------
# Tensor mapping: one rule per (group of) parameters, used in both directions.
# ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """`ours` (params paths, "router_bias:" prefix for the bias collection) computed
  from the HF tensors `theirs` by `load`, and back by `save`."""
  ours: tuple[str, ...]
  theirs: tuple[str, ...]
  load: Callable[..., tuple[np.ndarray, ...]]
  save: Callable[..., tuple[np.ndarray, ...]]


def _lin(*shape):
  """torch Linear weight (out, in) <-> ours (in, *shape) with prod(shape) == out."""
  return (lambda w: (w.T.reshape(w.shape[1], *shape),),
          lambda w: (w.reshape(w.shape[0], -1).T,))


def _out_lin(*shape):
  """torch Linear weight (out, prod(shape)) <-> ours (*shape, out)."""
  return (lambda w: (w.T.reshape(*shape, w.shape[0]),),
          lambda w: (w.reshape(-1, w.shape[-1]).T,))


_same = (lambda w: (w,), lambda w: (w,))


def rope_permutation(dim: int) -> np.ndarray:
  """Interleaved pair layout -> rotate-half layout: evens first, then odds."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def _rule(ours, theirs, fns) -> Rule:
  ours = (ours,) if isinstance(ours, str) else tuple(ours)
  theirs = (theirs,) if isinstance(theirs, str) else tuple(theirs)
  return Rule(ours, theirs, fns[0], fns[1])


def _mla_rules(c: ModelConfig, a: str, p: str, interleaved: bool) -> list[Rule]:
  n, dn, dr, dv, ck = (c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                       c.kv_lora_rank)
  perm = rope_permutation(dr) if interleaved else np.arange(dr)
  inv = np.argsort(perm)
  q_perm = np.concatenate([np.arange(dn), dn + perm])
  q_inv = np.argsort(q_perm)
  q_in = c.q_lora_rank or c.d_model

  def q_load(w):                                    # (N * (Dn + Dr), In)
    return (w.reshape(n, dn + dr, q_in)[:, q_perm].transpose(2, 0, 1),)

  def q_save(w):                                    # (In, N, Dn + Dr)
    return (w[:, :, q_inv].transpose(1, 2, 0).reshape(n * (dn + dr), q_in),)

  def kv_a_load(w):                                 # (C + Dr, D)
    return w[:ck].T, w[ck:][perm].T

  def kv_a_save(w_c, w_r):
    return (np.concatenate([w_c.T, w_r.T[inv]], axis=0),)

  def kv_b_load(w):                                 # (N * (Dn + Dv), C)
    w = w.reshape(n, dn + dv, ck).transpose(2, 0, 1)  # (C, N, Dn + Dv)
    return w[:, :, :dn], w[:, :, dn:]

  def kv_b_save(wk, wv):
    return (np.concatenate([wk, wv], axis=-1).transpose(1, 2, 0).reshape(-1, ck),)

  rules = []
  if c.q_lora_rank:
    rules += [_rule(f"{a}/wq_a", f"{p}.q_a_proj.weight", _lin(c.q_lora_rank)),
              _rule(f"{a}/q_norm/scale", f"{p}.q_a_layernorm.weight", _same)]
    rules.append(_rule(f"{a}/wq", f"{p}.q_b_proj.weight", (q_load, q_save)))
  else:
    rules.append(_rule(f"{a}/wq", f"{p}.q_proj.weight", (q_load, q_save)))
  rules += [
      _rule((f"{a}/wkv_a", f"{a}/wk_rope"), f"{p}.kv_a_proj_with_mqa.weight",
            (kv_a_load, kv_a_save)),
      _rule(f"{a}/kv_norm/scale", f"{p}.kv_a_layernorm.weight", _same),
      _rule((f"{a}/wk_b", f"{a}/wv_b"), f"{p}.kv_b_proj.weight", (kv_b_load, kv_b_save)),
      _rule(f"{a}/wo", f"{p}.o_proj.weight", _out_lin(n, dv)),
  ]
  return rules


def _expert_rules(ours: str, theirs: list[str]) -> Rule:
  """E per-expert (F, D) / (D, F) torch weights <-> one stacked (E, in, out) array."""
  return Rule((ours,), tuple(theirs),
              lambda *ws: (np.stack([w.T for w in ws]),),
              lambda w: tuple(w[e].T for e in range(w.shape[0])))


def tensor_rules(c: ModelConfig, arch: str, hf: dict[str, Any] | None = None) -> list[Rule]:
  """Every parameter of `c` as `arch`, with the HF tensors it comes from."""
  hf = hf or {}
  plan = make_plan(c)
  _unsupported_if(c.sharing != "none", f"sharing={c.sharing!r} (HF has no shared layers)")
  rules = [_rule("embed", "model.embed_tokens.weight", _same),
           _rule("final_norm/scale", "model.norm.weight", _same)]
  if not c.tie_embeddings:
    rules.append(_rule("unembed", "lm_head.weight", (lambda w: (w.T,), lambda w: (w.T,))))
  moe_sets = moe_layer_sets(c)
  nq, nkv, hd = c.n_heads, c.n_kv_heads, c.resolved_head_dim
  for i in range(c.n_layers):
    p = f"model.layers.{i}"
    a = f"attn_{plan.attn[i]}"
    rules.append(_rule(f"{a}/norm/scale", f"{p}.input_layernorm.weight", _same))
    a, s = f"{a}/attn", f"{p}.self_attn"
    if c.attention == "mla":
      rules += _mla_rules(c, a, s, interleaved=arch == "deepseek_v2" or bool(
          hf.get("rope_interleave", True)))
    else:
      rules += [_rule(f"{a}/wq", f"{s}.q_proj.weight", _lin(nq, hd)),
                _rule(f"{a}/wk", f"{s}.k_proj.weight", _lin(nkv, hd)),
                _rule(f"{a}/wv", f"{s}.v_proj.weight", _lin(nkv, hd)),
                _rule(f"{a}/wo", f"{s}.o_proj.weight", _out_lin(nq, hd))]
      if c.qkv_bias:
        rules += [_rule(f"{a}/b{x}", f"{s}.{x}_proj.bias",
                        (lambda w, h=h: (w.reshape(h, hd),), lambda w: (w.reshape(-1),)))
                  for x, h in (("q", nq), ("k", nkv), ("v", nkv))]
      if c.qk_norm:
        rules += [_rule(f"{a}/{x}_norm/scale", f"{s}.{x}_norm.weight", _same) for x in "qk"]
    if i < c.n_dense_layers:
      f = f"dense_ffn_{plan.ffn[i]}"
      rules.append(_rule(f"{f}/norm/scale", f"{p}.post_attention_layernorm.weight", _same))
      rules += [_rule(f"{f}/mlp/w_{x}", f"{p}.mlp.{x}_proj.weight",
                      (lambda w: (w.T,), lambda w: (w.T,))) for x in ("gate", "up", "down")]
      continue
    f = moe_sets[i - c.n_dense_layers]
    rules.append(_rule(f"{f}/norm/scale", f"{p}.post_attention_layernorm.weight", _same))
    m = f"{p}.block_sparse_moe" if arch == "mixtral" else f"{p}.mlp"
    rules.append(_rule(f"{f}/moe/router/kernel", f"{m}.gate.weight",
                       (lambda w: (w.T,), lambda w: (w.T,))))
    if c.router_bias:
      rules.append(_rule(f"router_bias:{f}/moe/router/bias",
                         f"{m}.gate.e_score_correction_bias", _same))
    names = {"gate": "w1", "up": "w3", "down": "w2"} if arch == "mixtral" else {
        x: f"{x}_proj" for x in ("gate", "up", "down")}
    for x, name in names.items():
      rules.append(_expert_rules(f"{f}/moe/w_{x}", [f"{m}.experts.{e}.{name}.weight"
                                                    for e in range(c.n_experts)]))
    if c.n_shared_experts:
      sh = f"{m}.shared_expert" if arch == "qwen2_moe" else f"{m}.shared_experts"
      rules += [_rule(f"{f}/moe/shared_experts/w_{x}", f"{sh}.{x}_proj.weight",
                      (lambda w: (w.T,), lambda w: (w.T,))) for x in ("gate", "up", "down")]
      if c.shared_expert_gate:
        rules.append(_rule(f"{f}/moe/shared_gate", f"{m}.shared_expert_gate.weight",
                           (lambda w: (w[0],), lambda w: (w[None, :],))))
  return rules
