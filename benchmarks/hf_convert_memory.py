"""Peak host memory of `moe_jax.hf.convert` against the checkpoint's size.

    python benchmarks/hf_convert_memory.py [--layers 4 --d-model 1024 --experts 8]

Writes a random Mixtral-shaped bf16 checkpoint (synthetic weights, real layout) to a
temporary directory, converts it in a fresh process and reports that process's peak
RSS next to the checkpoint size and the RSS of a process that only imports
moe_jax.hf.convert and builds the abstract model (the fixed cost). Streaming shows
as peak - fixed ~ one copy of the weights, not two.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np

CHILD = """
import resource, sys
from moe_jax.hf import convert
{body}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def write_checkpoint(path: str, layers: int, d: int, experts: int) -> int:
  from moe_jax.hf.safetensors_io import write_safetensors
  f, vocab, heads, kv = 2 * d, 32000, d // 128, max(1, d // 512)
  rng = np.random.default_rng(0)

  def w(*shape):
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  config = {"architectures": ["MixtralForCausalLM"], "vocab_size": vocab,
            "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": f,
            "num_local_experts": experts, "num_experts_per_tok": 2, "rope_theta": 1e6,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config, fh)
  total = 0
  for i in range(layers):   # one shard per layer, as published checkpoints are sharded
    p = f"model.layers.{i}"
    t = {f"{p}.input_layernorm.weight": w(d), f"{p}.post_attention_layernorm.weight": w(d),
         f"{p}.self_attn.q_proj.weight": w(d, d), f"{p}.self_attn.o_proj.weight": w(d, d),
         f"{p}.self_attn.k_proj.weight": w(kv * 128, d),
         f"{p}.self_attn.v_proj.weight": w(kv * 128, d),
         f"{p}.block_sparse_moe.gate.weight": w(experts, d)}
    for e in range(experts):
      m = f"{p}.block_sparse_moe.experts.{e}"
      t.update({f"{m}.w1.weight": w(f, d), f"{m}.w3.weight": w(f, d), f"{m}.w2.weight": w(d, f)})
    total += write_safetensors(os.path.join(path, f"model-{i:05d}.safetensors"), t)
  total += write_safetensors(os.path.join(path, "model-embed.safetensors"), {
      "model.embed_tokens.weight": w(vocab, d), "lm_head.weight": w(vocab, d),
      "model.norm.weight": w(d)})
  return total


def peak_rss(body: str) -> int:
  out = subprocess.run([sys.executable, "-c", CHILD.format(body=body)], check=True,
                       capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=1024)
  p.add_argument("--experts", type=int, default=8)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "hf")
    os.makedirs(src)
    size = write_checkpoint(src, args.layers, args.d_model, args.experts)
    fixed = peak_rss(f"from moe_jax.hf import archs\nfrom moe_jax.models.counting import "
                     f"abstract_params\nabstract_params(archs.to_model_config("
                     f"convert.read_hf_config({src!r})))")
    peak = peak_rss(f"convert.convert_from_hf({src!r}, {os.path.join(tmp, 'run')!r})")
  gb = 1e9
  print(json.dumps({"checkpoint_gb": round(size / gb, 3), "fixed_rss_gb": round(fixed / gb, 3),
                    "convert_peak_rss_gb": round(peak / gb, 3),
                    "peak_minus_fixed_over_checkpoint": round((peak - fixed) / size, 2)}))


if __name__ == "__main__":
  main()
