"""Test set-up: 8 simulated CPU devices (for the sharding tests), float32 matmuls."""
import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is XLA compiling tiny models, not running them: LLVM's optimisation
# passes take about half of it (tests/test_quant.py: 264 s of CPU -> 134 s). Tests
# compare computations compiled alike, and the tolerances of those against NumPy or
# torch references hold at either level; experiments and benchmarks keep the default.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0").strip()
import chex  # noqa: E402

chex.set_n_cpu_devices(8)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
