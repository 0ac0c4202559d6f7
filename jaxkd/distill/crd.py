"""CRD: contrastive representation distillation with momentum memory banks (RepDistiller).

Both pooled features go through trainable `Embed` heads (linear + L2 normalisation, 128-d);
the NCE loss contrasts each anchor with its positive and K negatives drawn from a memory bank
of the other side's embeddings, one row per training example. The banks and the fixed
normaliser Z live in ``TrainState.method_state['crd']`` (a `jaxkd.losses.relation.CRDMemory`);
negatives are drawn inside the step from the step's key.

RepDistiller's CIFAR recipe: ``losses={'ce': 1.0, 'kd': 0.0, 'crd': 0.8}``, feat_dim 128,
K = 16384 negatives, NCE temperature 0.07, memory momentum 0.5.

Negatives (option ``negatives``): ``'uniform'`` (default) over the dataset with replacement,
ContrastMemory's own draw; ``'other_class'`` without replacement among the examples of other
classes, RepDistiller's CIFAR-100 loader (`CIFAR100InstanceSample`, mode 'exact', what its CRD
results use). The latter reads every training label (`distill.build(train_labels=...)`, which
`jaxkd.train` supplies) and draws a [B, N] uniform matrix and its top-K per step.
"""

from jaxkd.distill import LossDef, LossInputs, register
from jaxkd.distill.feature import embed_heads, feature_pairs, pooled_feature, selectors
from jaxkd.losses import relation


def _crd(inputs: LossInputs):
  if inputs.index is None:
    raise ValueError("crd reads the dataset index of every example: the batch needs 'index'")
  (student,), (teacher,) = feature_pairs(inputs, pooled_feature)
  memory = inputs.state
  contrast_index = relation.crd_sample_contrast_index(
    inputs.rng,
    inputs.index,
    memory.student_bank.shape[0],
    inputs.options["num_negatives"],
    dataset_labels=inputs.train_labels if _other_class(inputs.options) else None,
  )
  return relation.crd(
    inputs.adapter["student"](student),
    inputs.adapter["teacher"](teacher),
    memory,
    inputs.index,
    contrast_index,
    temperature=inputs.hparams["temperature"],
    momentum=inputs.hparams["momentum"],
    eps=inputs.options["eps"],
  )


def _init_memory(options, info, num_train_examples, rng):
  del info
  if num_train_examples is None:
    raise ValueError(
      "crd keeps one memory row per training example: pass num_train_examples to distill.build"
    )
  return relation.crd_memory_init(rng, num_train_examples, options["feat_dim"])


def _other_class(options) -> bool:
  if options["negatives"] not in ("uniform", "other_class"):
    raise ValueError(
      f"crd.negatives must be 'uniform' or 'other_class', got {options['negatives']!r}"
    )
  return options["negatives"] == "other_class"


_student_selector, _teacher_selector = selectors(pooled_feature)
register(
  LossDef(
    name="crd",
    compute=_crd,
    hparams={"temperature": 0.07, "momentum": 0.5},
    ranges={"temperature": "positive", "momentum": "unit_interval"},
    options={
      "features": None,
      "feat_dim": 128,
      "num_negatives": 16384,
      "eps": 1e-7,
      "negatives": "uniform",
    },
    choices={"negatives": ("uniform", "other_class")},
    student_features=_student_selector,
    teacher_features=_teacher_selector,
    adapter=lambda options, info, rngs: embed_heads(options, info, rngs, pooled_feature, True),
    init_state=_init_memory,
    needs_train_labels=_other_class,
  )
)
