"""Relation-based distillation losses: the student matches relations between samples.

Pure functions of arrays (jax, numpy and optax only): jit, vmap and grad safe. Every loss here is
a batch-level loss returning a float32 scalar (relations couple the samples of the batch). CRD's
memory bank is explicit state: `crd` takes a `CRDMemory` and returns the updated one.

Flattening order does not matter for these losses (Gram matrices, pairwise distances and angles are
invariant to a permutation of the feature axis), so NHWC and NCHW features give the same value.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxkd.losses.feature import _HIGHEST, _NORMALIZE_EPS, _as_float32, _as_list
from jaxkd.losses.feature import l2_norm, l2_normalize
from jaxkd.losses.reduction import NON_NEGATIVE
from jaxkd.losses.reduction import POSITIVE
from jaxkd.losses.reduction import POSITIVE_INTEGER
from jaxkd.losses.reduction import UNIT_INTERVAL
from jaxkd.losses.reduction import check_arguments


def _flatten(features: jax.Array) -> jax.Array:
  features = _as_float32(features)
  return features.reshape(features.shape[0], -1)


def _gram(x: jax.Array) -> jax.Array:
  return jnp.matmul(x, x.T, precision=_HIGHEST)


def similarity_preserving(
  student_features, teacher_features, *, eps: float = _NORMALIZE_EPS
) -> jax.Array:
  """Similarity-preserving KD: `Σ_stages ‖normalize(G_s) − normalize(G_t)‖²_F / B²`.

  Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. Reproduces RepDistiller
  `distiller_zoo/SP.py` Similarity: G = f fᵀ on the flattened features [B, B], each row
  L2-normalised (`F.normalize(G)`, dim 1), squared Frobenius distance divided by B². The reference
  returns the per-stage list (RepDistiller uses one stage, the last feature map); it is summed here.

  Args:
    student_features: [B, ...] or a list of them (one per stage).
    teacher_features: the matching teacher features; sizes after the batch axis may differ.

  Returns:
    float32 scalar.
  """
  check_arguments("similarity_preserving", eps=(eps, POSITIVE))
  total = jnp.zeros((), jnp.float32)
  for student, teacher in zip(_as_list(student_features), _as_list(teacher_features), strict=True):
    batch = student.shape[0]
    student_gram = l2_normalize(_gram(_flatten(student)), axis=1, eps=eps)
    teacher_gram = l2_normalize(_gram(_flatten(teacher)), axis=1, eps=eps)
    total += jnp.sum(jnp.square(teacher_gram - student_gram)) / (batch * batch)
  return total


def pairwise_distances(embed: jax.Array, *, squared: bool = False, eps: float = 1e-12) -> jax.Array:
  """RepDistiller `RKDLoss.pdist`: [B, D] -> [B, B] Euclidean distances, zero diagonal.

  `‖e_i‖² + ‖e_j‖² − 2 e_i·e_j` clamped below at `eps` before the square root, which keeps the
  square root's gradient finite; identical samples thus sit at distance √eps (1e-6), not 0.
  """
  squared_norms = jnp.sum(jnp.square(embed), axis=1)
  distances = jnp.maximum(squared_norms[:, None] + squared_norms[None, :] - 2.0 * _gram(embed), eps)
  if not squared:
    distances = jnp.sqrt(distances)
  return jnp.where(jnp.eye(embed.shape[0], dtype=bool), 0.0, distances)


def _normalize_by_mean_positive(distances: jax.Array) -> jax.Array:
  """`d / mean(d[d > 0])`, the reference's scale normalisation (guarded for a batch of one)."""
  positive = distances > 0
  mean = jnp.sum(jnp.where(positive, distances, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
  return distances / jnp.where(mean > 0, mean, 1.0)


def _angles(embed: jax.Array, eps: float) -> jax.Array:
  """[B, B, B] cosines of the angle at vertex i between e_j − e_i and e_k − e_i."""
  differences = l2_normalize(embed[None, :, :] - embed[:, None, :], axis=2, eps=eps)
  return jnp.einsum("ijd,ikd->ijk", differences, differences, precision=_HIGHEST)


def _smooth_l1(predictions: jax.Array, targets: jax.Array, beta: float) -> jax.Array:
  """torch `F.smooth_l1_loss(…, beta)`, mean: the Huber loss with δ=β divided by β."""
  return jnp.mean(optax.losses.huber_loss(predictions, targets, delta=beta)) / beta


def rkd(
  student_embed: jax.Array,
  teacher_embed: jax.Array,
  *,
  distance_weight: float = 25.0,
  angle_weight: float = 50.0,
  smooth_l1_beta: float = 1.0,
  eps: float = 1e-12,
) -> jax.Array:
  """Relational KD: distance-wise plus angle-wise smooth-L1 between relation structures.

  Park et al., "Relational Knowledge Distillation", CVPR 2019. Reproduces RepDistiller
  `distiller_zoo/RKD.py` RKDLoss (w_d=25, w_a=50):

    d = pdist(f) / mean(pdist(f)[pdist > 0])    (pdist: `pairwise_distances`, eps 1e-12)
    a_ijk = ⟨normalize(f_j − f_i), normalize(f_k − f_i)⟩
    loss = w_d · smooth_l1(d_s, d_t) + w_a · smooth_l1(a_s, a_t),

  smooth-L1 as torch's (β=1, mean over the B² distances and B³ angles, diagonals included). The
  teacher side carries no gradient (the reference computes it under `torch.no_grad()`).

  Args:
    student_embed: [B, ...] student features (flattened per sample).
    teacher_embed: [B, ...] teacher features; the widths may differ.

  Returns:
    float32 scalar.
  """
  check_arguments(
    "rkd",
    distance_weight=(distance_weight, NON_NEGATIVE),
    angle_weight=(angle_weight, NON_NEGATIVE),
    smooth_l1_beta=(smooth_l1_beta, POSITIVE),
    eps=(eps, POSITIVE),
  )
  student, teacher = _flatten(student_embed), jax.lax.stop_gradient(_flatten(teacher_embed))
  distance_loss = _smooth_l1(
    _normalize_by_mean_positive(pairwise_distances(student, eps=eps)),
    _normalize_by_mean_positive(pairwise_distances(teacher, eps=eps)),
    smooth_l1_beta,
  )
  angle_loss = _smooth_l1(
    _angles(student, _NORMALIZE_EPS), _angles(teacher, _NORMALIZE_EPS), smooth_l1_beta
  )
  return distance_weight * distance_loss + angle_weight * angle_loss


def _cosine_affinity(embed: jax.Array, eps: float) -> jax.Array:
  """PKT's conditional probabilities: cosine similarity mapped to [0, 1], rows summing to 1."""
  unit = embed / (l2_norm(embed, axis=1) + eps)
  affinity = (_gram(unit) + 1.0) / 2.0
  return affinity / jnp.sum(affinity, axis=1, keepdims=True)


def pkt(student_embed: jax.Array, teacher_embed: jax.Array, *, eps: float = 1e-7) -> jax.Array:
  """Probabilistic knowledge transfer: KL between cosine-kernel conditional distributions.

  Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
  ECCV 2018. Reproduces RepDistiller `distiller_zoo/PKT.py` `cosine_similarity_loss` (eps 1e-7):
  f ← f / (‖f‖ + eps); P = ((f fᵀ + 1)/2) row-normalised, for student (Q) and teacher (P);

    loss = mean_{i,j} P_ij · log((P_ij + eps) / (Q_ij + eps))    (mean over all B² entries).

  The reference's NaN→0 replacement never fires (its denominators are ≥ eps); the norm here has a
  finite gradient at zero features.

  Args:
    student_embed: [B, ...] student features (flattened per sample).
    teacher_embed: [B, ...] teacher features; the widths may differ.

  Returns:
    float32 scalar.
  """
  check_arguments("pkt", eps=(eps, POSITIVE))
  student_affinity = _cosine_affinity(_flatten(student_embed), eps)
  teacher_affinity = _cosine_affinity(_flatten(teacher_embed), eps)
  return jnp.mean(
    teacher_affinity * (jnp.log(teacher_affinity + eps) - jnp.log(student_affinity + eps))
  )


def correlation_congruence(student_embed: jax.Array, teacher_embed: jax.Array) -> jax.Array:
  """Correlation congruence, RepDistiller's version: `mean_i Σ_d |δ_i,d| |δ_{i+1},d|`.

  Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019. Reproduces
  RepDistiller `distiller_zoo/CC.py` Correlation (the active class, "code emailed by the original
  author", not the commented-out Gram variant): with δ = f_s − f_t on embeddings of the same
  width (RepDistiller embeds both with `LinearEmbed`, here `Embed(normalize=False)`), the products
  of consecutive samples' absolute differences, summed over features and averaged over the B − 1
  pairs. Gradients flow into both sides (both embeddings are trained).

  Args:
    student_embed: [B, D], B >= 2 (one example has no pair: the reference's mean is NaN, here a
      ValueError).
    teacher_embed: [B, D].

  Returns:
    float32 scalar.
  """
  if student_embed.shape[0] < 2:
    raise ValueError(
      f"correlation_congruence pairs consecutive examples: it needs a batch of 2 or more, got "
      f"{student_embed.shape[0]}"
    )
  delta = jnp.abs(_flatten(student_embed) - _flatten(teacher_embed))
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))


class CRDMemory(NamedTuple):
  """CRD memory bank state (RepDistiller `crd/memory.py` ContrastMemory buffers).

  Attributes:
    student_bank: [n_data, feat_dim] student embeddings (`memory_v1`), contrasted with teacher
      anchors.
    teacher_bank: [n_data, feat_dim] teacher embeddings (`memory_v2`), contrasted with student
      anchors.
    student_normalizer: Z of the student-anchor scores (`Z_v1`); negative until the first batch
      sets it, then fixed.
    teacher_normalizer: Z of the teacher-anchor scores (`Z_v2`), likewise.
  """

  student_bank: jax.Array
  teacher_bank: jax.Array
  student_normalizer: jax.Array
  teacher_normalizer: jax.Array


def crd_memory_init(key: jax.Array, n_data: int, feat_dim: int) -> CRDMemory:
  """Initial CRD memory: both banks uniform in [−stdv, stdv], stdv = 1/√(feat_dim/3); Z unset (−1).

  As ContrastMemory.__init__ (`torch.rand(...) * 2 stdv − stdv`, `params[2:4] = −1`).
  """
  check_arguments(
    "crd_memory_init", n_data=(n_data, POSITIVE_INTEGER), feat_dim=(feat_dim, POSITIVE_INTEGER)
  )
  stdv = 1.0 / (feat_dim / 3) ** 0.5
  student_key, teacher_key = jax.random.split(key)
  bank_shape = (n_data, feat_dim)
  unset = jnp.full((), -1.0, jnp.float32)
  return CRDMemory(
    student_bank=jax.random.uniform(student_key, bank_shape, jnp.float32, -stdv, stdv),
    teacher_bank=jax.random.uniform(teacher_key, bank_shape, jnp.float32, -stdv, stdv),
    student_normalizer=unset,
    teacher_normalizer=unset,
  )


def crd_sample_contrast_index(
  key: jax.Array,
  index: jax.Array,
  n_data: int,
  num_negatives: int,
  *,
  dataset_labels: jax.Array | None = None,
) -> jax.Array:
  """Contrast indices [B, 1 + K]: column 0 the positive (`index`), then K negatives.

  Without `dataset_labels`: negatives uniform over the dataset, with replacement, as
  ContrastMemory's `AliasMethod` draw over uniform unigrams (used when no indices are given).
  With `dataset_labels` ([n_data] class of every training example): negatives drawn without
  replacement among the examples of other classes, as RepDistiller's training data
  (`dataset/cifar100.py` CIFAR100InstanceSample, mode 'exact',
  `np.random.choice(cls_negative[target], k, replace=False)`); this needs K ≤ the number of
  other-class examples, and costs a [B, n_data] random draw and top-k per call.

  Args:
    key: PRNG key.
    index: [B] dataset indices of the batch examples.
    n_data: dataset size (rows of the memory bank).
    num_negatives: K (16384 in the CIFAR-100 recipe).
    dataset_labels: optional [n_data] integer labels.

  Returns:
    int32 [B, 1 + K].
  """
  check_arguments(
    "crd_sample_contrast_index",
    n_data=(n_data, POSITIVE_INTEGER),
    num_negatives=(num_negatives, POSITIVE_INTEGER),
  )
  index = jnp.asarray(index, jnp.int32)
  batch = index.shape[0]
  if dataset_labels is None:
    negatives = jax.random.randint(key, (batch, num_negatives), 0, n_data, jnp.int32)
  else:
    dataset_labels = jnp.asarray(dataset_labels)
    same_class = dataset_labels[None, :] == dataset_labels[index][:, None]
    # Top-k of i.i.d. uniform scores is a uniform subset without replacement.
    scores = jnp.where(same_class, -1.0, jax.random.uniform(key, (batch, n_data)))
    negatives = jax.lax.top_k(scores, num_negatives)[1].astype(jnp.int32)
  return jnp.concatenate([index[:, None], negatives], axis=1)


def _nce_loss(log_scores: jax.Array, n_data: int, eps: float) -> jax.Array:
  """RepDistiller ContrastLoss (Eq. 18) on log P, P = exp(s/T)/Z, [B, 1 + K], positive first.

  With m = K noise samples at P_n = 1/n_data and c = m·P_n + eps:
  loss = −(Σ_b log(P_pos/(P_pos + c)) + Σ_{b,k} log(m·P_n/(P_neg + c))) / B, in log space.
  """
  batch, num_negatives = log_scores.shape[0], log_scores.shape[1] - 1
  noise_mass = num_negatives / n_data
  log_shift = jnp.log(noise_mass + eps)
  log_d1 = log_scores[:, 0] - jnp.logaddexp(log_scores[:, 0], log_shift)
  log_d0 = jnp.log(noise_mass) - jnp.logaddexp(log_scores[:, 1:], log_shift)
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / batch


def _contrast_logits(
  bank: jax.Array, contrast_index: jax.Array, anchor: jax.Array, temperature: float
) -> jax.Array:
  """`bmm(bank[contrast_index], anchor) / T`: [B, 1 + K] scores, the bank detached."""
  contrast = jax.lax.stop_gradient(bank[contrast_index])
  return jnp.einsum("bkd,bd->bk", contrast, anchor, precision=_HIGHEST) / temperature


def _log_normalized(logits: jax.Array, normalizer: jax.Array, n_data: int):
  """log(exp(logits) / Z), Z = the stored normaliser or, if unset, mean(exp(logits))·n_data."""
  first_batch_z = jnp.exp(jax.nn.logsumexp(logits) - jnp.log(logits.size) + jnp.log(n_data))
  normalizer = jnp.where(normalizer < 0, jax.lax.stop_gradient(first_batch_z), normalizer)
  return logits - jnp.log(normalizer), normalizer


def _momentum_update(
  bank: jax.Array, index: jax.Array, embed: jax.Array, momentum: float
) -> jax.Array:
  """Rows `index` ← normalize(momentum·bank[index] + (1 − momentum)·embed), without gradient."""
  updated = bank[index] * momentum + jax.lax.stop_gradient(embed) * (1.0 - momentum)
  return bank.at[index].set(l2_normalize(updated, axis=1))


def crd(
  student_embed: jax.Array,
  teacher_embed: jax.Array,
  memory: CRDMemory,
  index: jax.Array,
  contrast_index: jax.Array,
  *,
  temperature: float = 0.07,
  momentum: float = 0.5,
  eps: float = 1e-7,
) -> tuple[jax.Array, CRDMemory]:
  """Contrastive representation distillation with NCE over a momentum memory bank.

  Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020. Reproduces
  RepDistiller `crd/criterion.py` CRDLoss + ContrastLoss and `crd/memory.py` ContrastMemory:

    P_s = exp(teacher_bank[contrast_index] · e_s / T) / Z_s   (student anchor, `out_v1`)
    P_t = exp(student_bank[contrast_index] · e_t / T) / Z_t   (teacher anchor, `out_v2`)
    loss = NCE(P_s) + NCE(P_t),   NCE: ContrastLoss with P_n = 1/n_data, eps 1e-7.

  Z is estimated once, from the first batch (mean(exp(·/T)) · n_data), then kept fixed: it lives
  in the memory state (negative = unset) and carries no gradient (the reference stores a Python
  float). The scores use the banks as they were before this batch; afterwards the rows `index` of
  each bank move to `normalize(momentum·row + (1 − momentum)·embed)` — the reference's order.
  `n_data` is the bank's number of rows. The banks carry no gradient; the embeddings do (both
  `Embed` heads are trained).

  Domain: Z is a float32 number, as the reference's, so the first batch's mean(exp(s/T)) · n_data
  must stay below float32's 3.4e38: scores s/T below about 88 - 2.3 log10(n_data), i.e. T above
  about 0.013 for the unit-norm embeddings and banks of the recipe (T = 0.07 is far inside). Past it
  Z is inf and the loss is inf, as in the reference.

  Args:
    student_embed: [B, feat_dim] `Embed` output of the student (L2-normalised).
    teacher_embed: [B, feat_dim] `Embed` output of the teacher.
    memory: `CRDMemory` from `crd_memory_init` or the previous step.
    index: [B] dataset indices of the batch examples.
    contrast_index: [B, 1 + K] indices, the positive first (`crd_sample_contrast_index`).
    temperature: NCE temperature T (0.07).
    momentum: memory momentum (0.5).
    eps: ContrastLoss eps (1e-7).

  Returns:
    (float32 scalar loss, updated `CRDMemory`).
  """
  check_arguments(
    "crd",
    temperature=(temperature, POSITIVE),
    momentum=(momentum, UNIT_INTERVAL),
    eps=(eps, POSITIVE),
  )
  student_embed, teacher_embed = _as_float32(student_embed), _as_float32(teacher_embed)
  n_data = memory.student_bank.shape[0]
  log_student_scores, student_normalizer = _log_normalized(
    _contrast_logits(memory.teacher_bank, contrast_index, student_embed, temperature),
    memory.student_normalizer,
    n_data,
  )
  log_teacher_scores, teacher_normalizer = _log_normalized(
    _contrast_logits(memory.student_bank, contrast_index, teacher_embed, temperature),
    memory.teacher_normalizer,
    n_data,
  )
  loss = _nce_loss(log_student_scores, n_data, eps) + _nce_loss(log_teacher_scores, n_data, eps)
  new_memory = CRDMemory(
    student_bank=_momentum_update(memory.student_bank, index, student_embed, momentum),
    teacher_bank=_momentum_update(memory.teacher_bank, index, teacher_embed, momentum),
    student_normalizer=student_normalizer,
    teacher_normalizer=teacher_normalizer,
  )
  return loss, new_memory
