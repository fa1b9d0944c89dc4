"""Alignment, the third training stage: a constitution of written principles with
programmatic judges, prompts (corpus + red team), SL-CAI revisions, and a
Bradley-Terry reward model with one head per principle (the policy learners, PPO
and GRPO, build on these)."""

from moe_jax.align.batching import IGNORE, ShuffledBatches, encode_sequences
from moe_jax.align.constitution import (
    PASS_THRESHOLD,
    Principle,
    judge_scores,
    load_constitution,
    parse_constitution,
    passes,
    principle_by_id,
    score_batch,
)
from moe_jax.align.judges import KINDS, text_domain
from moe_jax.align.prompts import (
    MAX_PROMPT_BYTES,
    Prompt,
    alignment_prompts,
    corpus_prompts,
    encode_prompts,
    red_team_prompts,
)
from moe_jax.align.reward import (
    PAIR_KEYS,
    Pair,
    bradley_terry_loss,
    pair_accuracy,
    pair_arrays,
    pair_iterator,
    preference_pairs,
    revision_pairs,
    reward_objective,
    reward_params,
    reward_scores,
    score_texts,
    soft_label,
)
from moe_jax.align.slcai import (
    build_revisions,
    critique,
    lm_rows,
    revise,
    revise_sampled,
    slcai_batches,
)

# --- RL (alignrl): rollouts with the engine's KV cache, PPO, GRPO -----------------
from moe_jax.align.rl_math import (gae, group_advantages, kl_estimate, policy_loss,
                                   token_rewards, value_loss, whiten)
from moe_jax.align.rollout import PromptIterator, response_mask, sample_responses
from moe_jax.align.ppo import RLConfig, ppo_objective
from moe_jax.align.grpo import grpo_objective
