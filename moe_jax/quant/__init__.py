"""Quantization: the source's variance-grouped mixed 8/4-bit weights.

    from moe_jax.quant import QuantConfig, fake_quantize_params, quantize_params
    qcfg = QuantConfig()                               # 8-bit sym / 4-bit asym, q = 0.7
    fq = fake_quantize_params(params, qcfg)            # QAT / PTQ: same tree, quantized values
    qparams = quantize_params(params, qcfg)            # real storage: QTensors (int8, packed int4)
    storage.save(path, qparams)                        # orbax; returns bytes on disk
    logits = inference.forward(qparams, tokens, mcfg)  # int8 x int8 -> int32 matmuls

config.py (settings), core.py (grouping, quantizers, STE, fake quantization),
storage.py (QTensor, int4 packing, orbax), inference.py (integer forward, timing),
qat.py (quantization-aware fine-tuning).
"""
from moe_jax.quant import core, inference, qat, storage
from moe_jax.quant.config import QuantConfig
from moe_jax.quant.core import compute_groups, fake_quant, fake_quantize_params
from moe_jax.quant.storage import QTensor, dequantize_params, quantize_params

__all__ = ["QuantConfig", "QTensor", "compute_groups", "core", "dequantize_params",
           "fake_quant", "fake_quantize_params", "inference", "qat", "quantize_params",
           "storage"]
