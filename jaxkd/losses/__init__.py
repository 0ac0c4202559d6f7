"""Knowledge-distillation losses as pure JAX functions (jax, numpy and optax only).

Every loss computes in float32 internally, states its formula, paper and the reference
implementation whose convention it reproduces; see docs/losses.md for the table.
"""
# Each section is owned by one module; keep the imports explicit.

# --- logit losses (logit.py) ---
from jaxkd.losses.logit import akl
from jaxkd.losses.logit import correlation_kd
from jaxkd.losses.logit import dist
from jaxkd.losses.logit import dkd
from jaxkd.losses.logit import dkd_warmup_factor
from jaxkd.losses.logit import jsd
from jaxkd.losses.logit import kd
from jaxkd.losses.logit import mse_logits
from jaxkd.losses.logit import reverse_kl
from jaxkd.losses.logit import skew_kl
from jaxkd.losses.logit import skew_reverse_kl
from jaxkd.losses.logit import soft_cross_entropy
from jaxkd.losses.logit import soft_rank
from jaxkd.losses.logit import standardize
from jaxkd.losses.logit import tvd
from jaxkd.losses.reduction import Reduction
from jaxkd.losses.reduction import reduce_loss

# --- feature and relation losses (feature.py, relation.py) ---
from jaxkd.losses.feature import adaptive_avg_pool2d
from jaxkd.losses.feature import attention_transfer
from jaxkd.losses.feature import fitnet
from jaxkd.losses.feature import hidden_cosine
from jaxkd.losses.feature import hidden_mse
from jaxkd.losses.feature import nst
from jaxkd.losses.feature import review_hcl
from jaxkd.losses.feature import vid
from jaxkd.losses.relation import CRDMemory
from jaxkd.losses.relation import correlation_congruence
from jaxkd.losses.relation import crd
from jaxkd.losses.relation import crd_memory_init
from jaxkd.losses.relation import crd_sample_contrast_index
from jaxkd.losses.relation import pkt
from jaxkd.losses.relation import rkd
from jaxkd.losses.relation import similarity_preserving

# --- sequence / LLM losses (sequence.py, chunked.py) ---
from jaxkd.losses.chunked import LMHead
from jaxkd.losses.chunked import chunked_kd
from jaxkd.losses.chunked import chunked_lm_loss
from jaxkd.losses.chunked import soft_cap
from jaxkd.losses.sequence import SparseTeacher
from jaxkd.losses.sequence import bool_mask
from jaxkd.losses.sequence import check_top_k
from jaxkd.losses.sequence import check_vocab_sizes
from jaxkd.losses.sequence import decode_sparse_teacher
from jaxkd.losses.sequence import encode_sparse_teacher
from jaxkd.losses.sequence import per_token_cross_entropy
from jaxkd.losses.sequence import per_token_divergence
from jaxkd.losses.sequence import sequence_cross_entropy
from jaxkd.losses.sequence import sequence_loss
from jaxkd.losses.sequence import slice_vocab
from jaxkd.losses.sequence import sparse_bytes_per_token
from jaxkd.losses.sequence import sparse_id_dtype
from jaxkd.losses.sequence import sparse_teacher_from_logits
from jaxkd.losses.sequence import sparse_topk_kd
from jaxkd.losses.sequence import token_mean
from jaxkd.losses.sequence import truncate_teacher
