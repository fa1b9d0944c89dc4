"""Data pipeline: embedded corpus, tokenizers, entropy filter, mixtures, grain.

    from moe_jax import data
    cfg = data.DataConfig(seq_len=128, batch_tokens=4096, mixture="curriculum")
    batch = next(data.make_train_iterator(cfg))  # inputs/targets (B, T), domain (B,)
"""

from moe_jax.data.corpus import (
    DEFAULT_DOMAINS,
    Corpus,
    build_corpus,
    expand_paths,
    is_heldout,
    iter_documents,
    load_array_record,
    load_documents,
    load_jsonl,
    load_text_files,
    split_documents,
)
from moe_jax.data.math_problems import (
    generate_math_documents,
    math_accuracy,
    problems_in,
    score_answer,
    split_problem,
)
from moe_jax.data.mixture import (
    MixtureSchedule,
    constant_mixture,
    domain_curriculum,
    uniform_mixture,
    with_share,
)
from moe_jax.data.pipeline import (
    DataConfig,
    ScheduledMixIterDataset,
    check_enough_data,
    corpus_from_config,
    make_eval_batches,
    make_train_iterator,
    pack_documents,
    packed_rows,
    schedule_from_config,
)
from moe_jax.data.quality import (
    derived_anomalies,
    filter_report,
    is_low_quality,
    keep_mask,
    mix_junk,
    synthetic_anomalies,
    token_entropy,
)
from moe_jax.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    get_tokenizer,
)
