"""Training: the objective API (objective.py), the guarded jitted step (step.py), the
one loop (loop.py), run identity and resume (runs.py), checksummed orbax checkpoints
(checkpoint.py), metrics and monitoring thresholds (monitoring.py)."""
from moe_jax.train.checkpoint import CheckpointError, Checkpointer
from moe_jax.train.loop import RunResult, TrainingDiverged, evaluate, train
from moe_jax.train.objective import Objective, lm_objective, loss_fn
from moe_jax.train.runs import ConfigMismatch, move_aside
from moe_jax.train.step import (TrainState, eval_step, init_state, jit_steps,
                                make_optimizer, train_step)

__all__ = ["CheckpointError", "Checkpointer", "ConfigMismatch", "Objective", "RunResult",
           "TrainingDiverged", "evaluate", "lm_objective", "loss_fn", "move_aside", "train",
           "TrainState", "eval_step", "init_state", "jit_steps", "make_optimizer",
           "train_step"]
