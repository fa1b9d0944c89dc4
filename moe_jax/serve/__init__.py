"""Serving: KV cache, engine (prefill / insert / generate), sampling, scheduler
(static, continuous, S/M/L/XL classes), HTTP server.

    engine = Engine(model_cfg, batch=8)                 # slots x context
    sched = Scheduler(engine, variables, policy="classes", detokenize=tok.decode)
    done = sched.run([Request(prompt=ids, max_new_tokens=32)])

kv_cache.py, sampling.py, engine.py, scheduler.py, load.py (runs -> variables),
server.py (aiohttp, the `serve` extra), __main__.py (python -m moe_jax.serve).
"""
from moe_jax.serve.engine import DecodeState, Engine, Prefix
from moe_jax.serve.load import CheckpointNotServable, load_run
from moe_jax.serve.sampling import SamplingConfig
from moe_jax.serve.scheduler import Request, Scheduler

__all__ = ["CheckpointNotServable", "DecodeState", "Engine", "Prefix", "Request",
           "SamplingConfig", "Scheduler", "load_run"]
