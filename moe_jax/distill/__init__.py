"""Progressive distillation from a MoE teacher to a small student.

    losses.py    feature L2, attention KL, logit KD, rule KL; the layer mapping
    rules.py     "logic distillation": a decision tree fitted on teacher decisions
    stages.py    a row of stages as ONE run of the training loop (one optimizer
                 state, one lr schedule; the step picks the stage's loss weights)
    generate.py  greedy decoding and side-by-side generation throughput
    completion.py  code-completion accuracy (greedy next-k tokens at line starts)

Experiment: `python -m experiments.run --exp=distill_stages`.
"""

from moe_jax.distill.completion import (
    code_completion,
    completion_prompts,
    completion_scores,
)
from moe_jax.distill.generate import generation_throughput, greedy_decode
from moe_jax.distill.losses import (
    attention_kl,
    feature_loss,
    group_heads,
    layer_map,
    logit_kd,
    rule_loss,
)
from moe_jax.distill.rules import RuleTree, apply_rules, describe_rules, fit_rules
from moe_jax.distill.stages import (
    MAX_STAGES,
    TERMS,
    StageConfig,
    distill_loss,
    distill_objective,
    evaluate_model,
    init_student,
    load_teacher,
    run_stages,
    stage_index,
    stage_table,
)
