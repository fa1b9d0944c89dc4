"""Test set-up: 8 simulated CPU devices (for the sharding tests), float32 matmuls."""
import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import chex  # noqa: E402

chex.set_n_cpu_devices(8)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
