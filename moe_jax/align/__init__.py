"""Alignment, the third training stage: a constitution, a reward model, PPO / GRPO."""

# --- RL (alignrl): rollouts with the engine's KV cache, PPO, GRPO -----------------
from moe_jax.align.rl_math import (gae, group_advantages, kl_estimate, policy_loss,
                                   token_rewards, value_loss, whiten)
from moe_jax.align.rollout import PromptIterator, response_mask, sample_responses
from moe_jax.align.ppo import RLConfig, ppo_objective
from moe_jax.align.grpo import grpo_objective
