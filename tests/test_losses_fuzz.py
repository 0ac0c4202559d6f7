"""Fuzzing of every public loss of `jaxkd.losses`: finite values and gradients at the extremes.

One hypothesis property per family (logit losses, transforms, feature losses, relation losses,
sequence losses), parametrised over the family's members. A member's builder draws one example:
the input dtype (float32, bfloat16, float16), the values (magnitudes from 1e-30 to 1e30 on that
dtype's grid, -inf entries with one finite entry left per row, ties and constant rows, zero and
identical features), masks (all True, random, per position, all False) and the hyperparameters
(temperatures in [0.05, 100], mixture weights including the endpoints 0 and 1). `_check` asserts:

* every output is float32 and finite, or exactly its documented value: 0 for an all-False mask,
  0 at the masked positions of per-position outputs, -inf where a transform keeps -inf;
* the gradient w.r.t. every float input is finite, and exactly 0 at -inf and masked entries;
* garbage (nan, +-inf, 3e38) at masked entries changes neither the values nor the gradients;
* with a bfloat16 or float16 input, the program does no arithmetic in 16 bits (checked on its
  jaxpr): the value is the float32 value of the upcast input, and the gradient is the float32
  gradient rounded to the input dtype, so it is finite wherever that dtype can hold it (a float16
  gradient beyond 65504 overflows the input dtype, not the loss).

Domains, outside which a loss is +inf or undefined by definition: the cross-entropies' targets
have finite logits, as do the ids of a sparse teacher in the student; squared errors take
magnitudes up to 1e15 (their squares must fit float32) and features up to 1e4; CRD embeddings are
unit-norm or zero with T >= 0.05 (crd's docstring); correlation_congruence needs two examples. `test_every_public_name_is_fuzzed`
keeps the tables complete: a new public name of `jaxkd.losses` fails it until it gets a builder
here (or a reason in `NOT_LOSSES`).

Speed: compilation dominates. Each member is one jitted program, compiled once (at XLA's cheapest
optimisation level), holding all its static variants (reductions, forms, shapes, with and
without mask) and taking masks and hyperparameters as traced arguments, so that examples only
change values. The inputs are float32 values on the drawn dtype's grid, and the 16-bit path is
checked by tracing, which compiles nothing.
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkd.losses
from jaxkd.losses import chunked
from jaxkd.losses import feature
from jaxkd.losses import logit
from jaxkd.losses import reduction
from jaxkd.losses import relation
from jaxkd.losses import sequence

_FUZZ = hypothesis.settings(
  max_examples=30,
  deadline=None,
  derandomize=True,
  suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
)
# The test programs are tiny: XLA's backend optimisations cost more compile time than they save.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# The largest finite magnitude drawn per dtype.
LARGEST = {jnp.float32: 1e30, jnp.bfloat16: 1e30, jnp.float16: 3e4}
TOKENS = (2, 3, 5)  # [B, S, V] logits; batch-level losses flatten them to 6 examples
GARBAGE = st.sampled_from([np.nan, np.inf, -np.inf, 3e38])


# ----------------------------------------------------------------------------------------------
# Strategies. Hypothesis favours the first of a set of choices: the extremes come first.
# ----------------------------------------------------------------------------------------------
TEMPERATURE = st.sampled_from([0.05, 100.0, 1.0]) | st.floats(0.05, 100.0)
UNIT = st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)
WEIGHT = st.sampled_from([0.0, 1.0]) | st.floats(0.0, 10.0)


def _draw_params(data, strategies: dict[str, st.SearchStrategy]) -> dict[str, jax.Array]:
  """Hyperparameters as float32 arrays: traced arguments of the compiled program."""
  return {name: jnp.float32(data.draw(s, label=name)) for name, s in strategies.items()}


@st.composite
def _neg_inf_entries(draw, shape):
  """Entries to set to -inf, at least one finite entry left per row."""
  entries = draw(hnp.arrays(np.bool_, shape))
  kept = draw(hnp.arrays(np.int64, shape[:-1], elements=st.integers(0, shape[-1] - 1)))
  np.put_along_axis(entries, kept[..., None], False, axis=-1)
  return entries


@st.composite
def _logits(draw, shape, largest):
  """float32 logits: one magnitude (0: constant rows) times draws in [-1, 1] (ties, tiny ones)."""
  scales = (largest, 1e4, 0.0, 100.0, 30.0, 1.0, 1e-3)
  scale = draw(st.sampled_from([s for s in scales if s <= largest]))
  unit = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1.0, 1.0, width=32)))
  return unit * np.float32(scale)


@st.composite
def _logit_pair(draw, shape, largest, neg_inf=True):
  """(student, teacher): independent, equal, or nearby (a converged student); -inf entries as
  shared padding or independent."""
  teacher = draw(_logits(shape, largest))
  kind = draw(st.sampled_from(["independent", "equal", "nearby"]))
  if kind == "independent":
    student = draw(_logits(shape, largest))
  elif kind == "equal":
    student = teacher.copy()
  else:
    relative = draw(st.sampled_from([1e-6, 1e-3]))
    noise = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1.0, 1.0, width=32)))
    student = (teacher * (1 + relative * noise)).astype(np.float32)
  if not neg_inf:
    return student, teacher
  student_inf = draw(_neg_inf_entries(shape))
  teacher_inf = student_inf if draw(st.booleans()) else draw(_neg_inf_entries(shape))
  return np.where(student_inf, -np.inf, student), np.where(teacher_inf, -np.inf, teacher)


@st.composite
def _mask(draw, shape):
  """A boolean mask: all True, random, constant along the last axis, or all False."""
  kind = draw(st.sampled_from(["all", "random", "rows", "none"]))
  if kind == "all":
    return np.ones(shape, bool)
  if kind == "random":
    return draw(hnp.arrays(np.bool_, shape))
  if kind == "rows":
    return np.broadcast_to(draw(hnp.arrays(np.bool_, shape[:-1]))[..., None], shape).copy()
  return np.zeros(shape, bool)


@st.composite
def _features(draw, shape, largest=1e4):
  """float32 features: normal, zeros, constant, identical samples or sparse, times a scale."""
  pattern = draw(st.sampled_from(["zeros", "identical_samples", "constant", "sparse", "normal"]))
  scale = draw(st.sampled_from([largest, 1e-30, 1e-6, 1.0]))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  values = rng.standard_normal(shape)
  if pattern == "zeros":
    values = np.zeros(shape)
  elif pattern == "constant":
    values = np.ones(shape)
  elif pattern == "identical_samples":
    values = np.broadcast_to(values[:1], shape)
  elif pattern == "sparse":
    values = np.where(rng.random(shape) < 0.7, 0.0, values)
  return (values * scale).astype(np.float32)


@st.composite
def _feature_pairs(draw, shapes):
  """Features for each (student shape, teacher shape); equal ones are sometimes identical."""
  arrays = []
  for student_shape, teacher_shape in shapes:
    student = draw(_features(student_shape))
    same = student_shape == teacher_shape and draw(st.booleans())
    arrays += [student, student.copy() if same else draw(_features(teacher_shape))]
  return tuple(arrays)


# ----------------------------------------------------------------------------------------------
# The shared assertions.
# ----------------------------------------------------------------------------------------------
Variant = Callable[[tuple[jax.Array, ...], dict[str, Any]], jax.Array]


class Program:
  """A member's output variants, `name -> fn(inputs, params)`, compiled together once.

  Compared by identity: build each program once (at import, or cached), so that `_compiled` finds
  it again. The variants are kept apart for `_assert_computes_in_float32`, which traces each alone.
  """

  def __init__(self, variants: dict[str, Variant]):
    self.variants = variants

  def __call__(self, inputs, params) -> dict[str, jax.Array]:
    return {name: variant(inputs, params) for name, variant in self.variants.items()}


class Expect(NamedTuple):
  """What one output of a program must be, beyond float32 and finite."""

  zero: bool = False  # exactly 0 everywhere (an all-False mask)
  zero_entries: np.ndarray | None = None  # exactly 0 there (masked positions)
  neg_inf_entries: np.ndarray | None = None  # exactly -inf there, finite elsewhere
  invariant: Callable[[np.ndarray], None] | None = None


class Example(NamedTuple):
  """One fuzzed call of a member's program.

  Attributes:
    program: the member's `Program`.
    inputs: float32 arrays, all differentiated; put on the example dtype's grid by `_check`.
    params: traced arguments that are not differentiated (masks, labels, hyperparameters).
    masked: per input, the entries outside its mask (None: none): they get garbage, and their
      gradient must be exactly 0.
    expect: per output variant, what it must be beyond float32 and finite.
    default: what the outputs not named in `expect` must be.
  """

  program: Program
  inputs: tuple[np.ndarray, ...]
  params: dict[str, Any]
  masked: tuple[np.ndarray | None, ...] | None = None
  expect: dict[str, Expect] = {}
  default: Expect = Expect()


def _value_and_grads(program: Program):
  """(outputs, gradients of a weighted sum of every finite float output w.r.t. the inputs)."""

  def weighted_sum(inputs, params):
    outputs = program(inputs, params)
    total = jnp.zeros((), jnp.float32)
    for value in outputs.values():
      if jnp.issubdtype(value.dtype, jnp.floating):
        # Irregular positive weights reach every entry (a plain sum of standardised logits would
        # be constant); a NaN gradient of any variant makes the sum's gradient NaN.
        weights = 1.5 + jnp.cos(jnp.arange(value.size, dtype=jnp.float32)).reshape(value.shape)
        total += jnp.sum(jnp.where(jnp.isfinite(value), value, 0.0) * weights)
    return total, outputs

  def evaluate(inputs, params):
    grads, outputs = jax.grad(weighted_sum, has_aux=True)(inputs, params)
    return outputs, grads

  return evaluate


def _jit(fn):
  return jax.jit(fn, compiler_options=_COMPILER_OPTIONS)


@functools.cache
def _compiled(program: Program):
  return _jit(_value_and_grads(program))


# Primitives that may output a 16-bit float: exact conversions, data movement and selection.
_EXACT_16BIT = {
  "convert_element_type",
  "broadcast_in_dim",
  "reshape",
  "squeeze",
  "expand_dims",
  "transpose",
  "slice",
  "dynamic_slice",
  "gather",
  "concatenate",
  "pad",
  "select_n",
  "copy",
  "copy_p",
}


def _sub_jaxprs(equation):
  for value in equation.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _arithmetic_16bit(jaxpr) -> set[str]:
  """The primitives of `jaxpr` (and its sub-jaxprs) that compute a 16-bit float."""
  found = set()
  for equation in jaxpr.eqns:
    inner = list(_sub_jaxprs(equation))
    for sub in inner:
      found |= _arithmetic_16bit(sub)
    if inner:
      continue  # a call: what it computes is checked inside
    for var in equation.outvars:
      if getattr(var.aval, "dtype", None) in (jnp.bfloat16, jnp.float16):
        if equation.primitive.name not in _EXACT_16BIT:
          found.add(equation.primitive.name)
  return found


_TRACED_16BIT = set()


def _assert_computes_in_float32(program: Program, inputs, params, dtype) -> None:
  """Traces each variant's value and gradient on `dtype` inputs: a float32 value, gradients of the
  input dtype, and no 16-bit arithmetic. Once per program, on the first 16-bit dtype drawn
  (tracing compiles nothing).

  Each variant alone: the variants of a program share its inputs, and the sum of their gradients
  would be the test's own 16-bit arithmetic, not the loss's.
  """
  if program in _TRACED_16BIT:
    return
  _TRACED_16BIT.add(program)
  low = tuple(jnp.asarray(x, dtype) for x in inputs)
  for name, variant in program.variants.items():

    def total(xs, variant=variant):
      value = variant(xs, params)
      finite = jnp.where(jnp.isfinite(value), value, 0)
      return jnp.sum(finite).astype(jnp.float32), value

    jaxpr, (grads, value) = jax.make_jaxpr(jax.grad(total, has_aux=True), return_shape=True)(low)
    if jnp.issubdtype(value.dtype, jnp.floating):
      assert value.dtype == jnp.float32, (name, value.dtype)
    assert all(g.dtype == dtype for g in grads), (name, [g.dtype for g in grads])
    arithmetic = _arithmetic_16bit(jaxpr.jaxpr)
    assert not arithmetic, (name, arithmetic)


def _on_grid(values, dtype) -> np.ndarray:
  """float32 values that `dtype` represents exactly: `values` rounded to it (3e38 becomes inf in
  float16), and upcast. In numpy: a jax cast would compile for every shape and dtype."""
  with np.errstate(over="ignore"):
    return np.asarray(values, np.float32).astype(jnp.dtype(dtype)).astype(np.float32)


def _check(data, example: Example, dtype) -> None:
  """The assertions of the module docstring, on one example at one dtype."""
  masked = example.masked or (None,) * len(example.inputs)
  clean = [_on_grid(x, dtype) for x in example.inputs]
  with_garbage = []
  for values, outside in zip(clean, masked, strict=True):
    if outside is not None and outside.any():
      garbage = data.draw(hnp.arrays(np.float32, values.shape, elements=GARBAGE), label="garbage")
      garbage = _on_grid(garbage, dtype)
      values = np.where(outside, garbage, values)
    with_garbage.append(values)
  params = jax.tree.map(jnp.asarray, example.params)
  outputs, grads = _compiled(example.program)(tuple(with_garbage), params)
  outputs = {name: np.asarray(value) for name, value in outputs.items()}
  grads = [np.asarray(grad) for grad in grads]

  for name, value in outputs.items():
    if not jnp.issubdtype(value.dtype, jnp.floating):
      continue
    expect = example.expect.get(name, example.default)
    assert value.dtype == np.float32, (name, value.dtype)
    neg_inf = np.zeros(value.shape, bool)
    if expect.neg_inf_entries is not None:
      neg_inf = np.broadcast_to(expect.neg_inf_entries, value.shape)
      assert np.all(value[neg_inf] == -np.inf), (name, value)
    assert np.all(np.isfinite(value[~neg_inf])), (name, value)
    if expect.zero:
      assert np.all(value == 0.0), (name, value)
    if expect.zero_entries is not None:
      assert np.all(value[expect.zero_entries] == 0.0), (name, value)
    if expect.invariant is not None:
      expect.invariant(value)

  for i, grad in enumerate(grads):
    assert np.all(np.isfinite(grad)), (i, grad)
    zero_grad = np.isneginf(clean[i])
    if masked[i] is not None:
      zero_grad = zero_grad | masked[i]
    assert np.all(grad[zero_grad] == 0.0), (i, grad)

  if any(m is not None and m.any() for m in masked):
    # Masked entries hold zeros or garbage: the same values and gradients, to the bit.
    clean_outputs, clean_grads = _compiled(example.program)(tuple(clean), params)
    for name, value in clean_outputs.items():
      np.testing.assert_array_equal(outputs[name], value, err_msg=name)
    for grad, clean_grad in zip(grads, clean_grads, strict=True):
      np.testing.assert_array_equal(grad, clean_grad)

  if dtype != jnp.float32:
    _assert_computes_in_float32(example.program, clean, params, dtype)


def _run(builder, data, dtypes=DTYPES):
  """Draws a dtype and one example of `builder`, and checks it."""
  dtype = data.draw(st.sampled_from(dtypes), label="dtype")
  _check(data, builder(data, dtype), dtype)


# ----------------------------------------------------------------------------------------------
# Logit losses: (student, teacher) [B, S, V] logits, every reduction, with and without `where`.
# ----------------------------------------------------------------------------------------------
REDUCTIONS = ("batchmean", "mean", "sum", "none")
# The reduction is shared code (fuzzed in full through reduce_loss): 'batchmean' and 'none' for
# every loss, 'mean' (the class-count denominators) for two.
PER_POSITION = ("batchmean", "none")


class LogitCase(NamedTuple):
  loss: Callable[..., jax.Array]
  hparams: dict[str, st.SearchStrategy]  # traced float hyperparameters
  reductions: tuple[str | None, ...] = PER_POSITION  # (None,): a batch-level scalar
  takes_where: bool = True  # False: batch-level; also evaluated on a single example
  statics: tuple[dict[str, Any], ...] = ({},)  # static options, all in the one program
  largest: float = 1e30


def _dkd(student, teacher, *, labels, **kwargs):
  return logit.dkd(student, teacher, labels, **kwargs)


LOGIT_LOSSES = {
  "kd": LogitCase(logit.kd, {"temperature": TEMPERATURE}, ("batchmean", "mean", "none")),
  "reverse_kl": LogitCase(logit.reverse_kl, {"temperature": TEMPERATURE}),
  "soft_cross_entropy": LogitCase(logit.soft_cross_entropy, {"temperature": TEMPERATURE}),
  "jsd": LogitCase(logit.jsd, {"beta": UNIT, "temperature": TEMPERATURE}),
  "skew_kl": LogitCase(
    logit.skew_kl,
    {"alpha": UNIT, "temperature": TEMPERATURE},
    statics=({"form": "cross_entropy"}, {"form": "kl"}),
  ),
  "skew_reverse_kl": LogitCase(logit.skew_reverse_kl, {"alpha": UNIT, "temperature": TEMPERATURE}),
  "tvd": LogitCase(logit.tvd, {"temperature": TEMPERATURE}),
  "akl": LogitCase(logit.akl, {"head_threshold": UNIT, "temperature": TEMPERATURE}),
  "dkd": LogitCase(
    _dkd,
    {"alpha": WEIGHT, "beta": WEIGHT, "temperature": TEMPERATURE},
    statics=({}, {"gt_logit_offset": np.inf}),
  ),
  "mse_logits": LogitCase(logit.mse_logits, {}, ("batchmean", "mean", "none"), largest=1e15),
  "dist": LogitCase(
    logit.dist,
    {"beta": WEIGHT, "gamma": WEIGHT, "temperature": TEMPERATURE},
    reductions=(None,),
    takes_where=False,
  ),
  "correlation_kd": LogitCase(
    logit.correlation_kd,
    {
      "pearson_weight": WEIGHT,
      "spearman_weight": WEIGHT,
      "temperature": TEMPERATURE,
      "regularization_strength": st.floats(0.01, 100.0),
    },
    takes_where=False,
  ),
}


def _logit_variant(case, static, reduction_, second, inputs, params):
  kwargs = {k: v for k, v in params.items() if k != "where"} | static
  if reduction_:
    kwargs["reduction"] = reduction_
  if second and case.takes_where:
    kwargs["where"] = params["where"]
  return case.loss(*(inputs[2:] if second else inputs[:2]), **kwargs)


@functools.cache
def _logit_program(name: str) -> Program:
  """Inputs (student, teacher, student', teacher'): every static option and reduction on the
  first pair, and on the second with `where` (batch-level losses: as a batch of one example)."""
  case = LOGIT_LOSSES[name]
  second = "where" if case.takes_where else "single"
  return Program(
    {
      f"{i}/{kind}{r}": functools.partial(_logit_variant, case, static, r, bool(kind))
      for i, static in enumerate(case.statics)
      for r in case.reductions
      for kind in ("", f"{second}/")
    }
  )


def _logit_example(name, data, dtype):
  case = LOGIT_LOSSES[name]
  largest = min(case.largest, LARGEST[dtype])
  student, teacher = data.draw(_logit_pair(TOKENS, largest), label="logits")
  params = _draw_params(data, case.hparams)
  if name == "dkd":
    labels = hnp.arrays(np.int32, TOKENS[:-1], elements=st.integers(0, TOKENS[-1] - 1))
    params["labels"] = data.draw(labels, label="labels")
  program = _logit_program(name)
  if not case.takes_where:
    single = data.draw(_logit_pair((1, TOKENS[-1]), largest), label="single")
    return Example(program, (student, teacher, *single), params)
  where = data.draw(_mask(TOKENS), label="where")
  params["where"] = where
  expect = {
    f"{i}/where/{r}": Expect(
      zero=not where.any(), zero_entries=~where.any(-1) if r == "none" else None
    )
    for i in range(len(case.statics))
    for r in case.reductions
  }
  return Example(
    program,
    (student, teacher, student, teacher),
    params,
    masked=(None, None, ~where, ~where),
    expect=expect,
  )


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@_FUZZ
@hypothesis.given(data=st.data())
def test_logit_losses(name, data):
  _run(functools.partial(_logit_example, name), data)


# ----------------------------------------------------------------------------------------------
# Transforms: functions other losses compose with.
# ----------------------------------------------------------------------------------------------
_STANDARDIZE = Program(
  {
    "ddof0": lambda inputs, params: logit.standardize(inputs[0], ddof=0),
    "ddof1": lambda inputs, params: logit.standardize(inputs[0], ddof=1),
    "where": lambda inputs, params: logit.standardize(inputs[1], where=params["where"]),
  }
)


def _unit_variance(logits, ddof):
  """Rows whose std is far above the epsilon come out with sum of squares count - ddof."""
  included = np.isfinite(logits)
  count = included.sum(-1)
  values = np.where(included, logits.astype(np.float64), 0.0)
  mean = values.sum(-1, keepdims=True) / np.maximum(count, 1)[..., None]
  squares = np.sum(np.where(included, values - mean, 0.0) ** 2, -1)
  std = np.sqrt(squares / np.maximum(count - ddof, 1))
  checked = (count > ddof) & (std > 1e-2)

  def invariant(standardized):
    squares = np.sum(np.where(included, standardized.astype(np.float64), 0.0) ** 2, -1)
    np.testing.assert_allclose(squares[checked], (count - ddof)[checked], rtol=1e-3)

  return invariant


def _standardize(data, dtype):
  logits, _ = data.draw(_logit_pair(TOKENS, LARGEST[dtype]), label="logits")
  logits = _on_grid(logits, dtype)
  where = data.draw(_mask(TOKENS), label="where")
  return Example(
    _STANDARDIZE,
    (logits, logits),
    {"where": where},
    masked=(None, ~where),
    expect={
      f"ddof{ddof}": Expect(
        neg_inf_entries=np.isneginf(logits), invariant=_unit_variance(logits, ddof)
      )
      for ddof in (0, 1)
    }
    | {"where": Expect(neg_inf_entries=np.isneginf(logits) | ~where)},
  )


_SOFT_RANK = Program(
  {
    "ranks": lambda inputs, params: logit.soft_rank(
      inputs[0], regularization_strength=params["strength"]
    )
  }
)


def _soft_rank(data, dtype):
  values = data.draw(_logits(TOKENS, LARGEST[dtype]), label="values")
  strength = st.sampled_from([1e-3, 1.0, 1e3]) | st.floats(1e-3, 1e3)
  n = TOKENS[-1]

  def in_permutahedron(ranks):
    # Soft ranks are convex combinations of the permutations of (1, ..., n).
    np.testing.assert_allclose(ranks.sum(-1), n * (n + 1) / 2, rtol=1e-5)
    assert np.all(ranks >= 1 - 1e-4) and np.all(ranks <= n + 1e-4), ranks

  return Example(
    _SOFT_RANK,
    (values,),
    _draw_params(data, {"strength": strength}),
    expect={"ranks": Expect(invariant=in_permutahedron)},
  )


_WARMUP = Program(
  {"factor": lambda inputs, params: logit.dkd_warmup_factor(inputs[0], params["warmup_epochs"])}
)


def _dkd_warmup_factor(data, dtype):
  epoch = data.draw(hnp.arrays(np.float32, (3,), elements=st.floats(0.0, 6e4, width=32)))

  def in_unit_interval(factor):
    assert np.all((factor >= 0) & (factor <= 1)), factor

  warmup = st.sampled_from([1.0, 20.0]) | st.floats(1e-3, 1e3)
  return Example(
    _WARMUP,
    (epoch,),
    _draw_params(data, {"warmup_epochs": warmup}),
    expect={"factor": Expect(invariant=in_unit_interval)},
  )


def _reduce(name, inputs, params):
  return reduction.reduce_loss(inputs[0], name, positions=params["positions"], class_counts=5)


_REDUCE_LOSS = Program({r: functools.partial(_reduce, r) for r in REDUCTIONS})


def _reduce_loss(data, dtype):
  values = data.draw(_logits((2, 3), LARGEST[dtype] / 10), label="per_example")
  positions = data.draw(_mask((2, 3)), label="positions")
  expect = {r: Expect(zero=not positions.any()) for r in REDUCTIONS}
  expect["none"] = Expect(zero=not positions.any(), zero_entries=~positions)
  return Example(
    _REDUCE_LOSS, (values,), {"positions": positions}, masked=(~positions,), expect=expect
  )


# adaptive_avg_pool2d, soft_cap and slice_vocab are layers that keep their input's dtype, not
# float32 losses: their float32 outputs are checked (soft_cap gets the float32 logits
# chunked_lm_loss gives it).
def _pool(size, inputs, params):
  return jnp.asarray(feature.adaptive_avg_pool2d(inputs[0], size), jnp.float32)


_POOL = Program({str(size): functools.partial(_pool, size) for size in (1, 2, 3, (2, 3), 4)})


def _adaptive_avg_pool2d(data, dtype):
  return Example(_POOL, (data.draw(_features((2, 4, 4, 3)), label="features"),), {})


def _soft_cap(cap, inputs, params):
  return chunked.soft_cap(jnp.asarray(inputs[0], jnp.float32), params["cap"] if cap else None)


_SOFT_CAP = Program(
  {"capped": functools.partial(_soft_cap, True), "none": functools.partial(_soft_cap, False)}
)


def _soft_cap_example(data, dtype):
  logits = data.draw(_logits(TOKENS, LARGEST[dtype]), label="logits")
  params = _draw_params(data, {"cap": st.floats(1.0, 100.0)})

  def bounded(capped):
    assert np.all(np.abs(capped) <= float(params["cap"]) * (1 + 1e-6)), capped

  return Example(_SOFT_CAP, (logits,), params, expect={"capped": Expect(invariant=bounded)})


_SLICE_VOCAB = Program(
  {
    "sliced": lambda inputs, params: jnp.asarray(
      sequence.slice_vocab(inputs[0], TOKENS[-1]), jnp.float32
    )
  }
)


def _slice_vocab(data, dtype):
  # A teacher embedding padded by two rows past the student's vocabulary (-inf logits).
  logits, _ = data.draw(_logit_pair(TOKENS, LARGEST[dtype]), label="logits")
  padded = np.concatenate([logits, np.full((*TOKENS[:-1], 2), -np.inf, np.float32)], axis=-1)
  expect = {"sliced": Expect(neg_inf_entries=np.isneginf(logits))}
  return Example(_SLICE_VOCAB, (padded,), {}, expect=expect)


TOP_K = (1, 3, TOKENS[-1])


def _truncated(k, field, inputs, params):
  stored = sequence.truncate_teacher(
    inputs[0], top_p=params["top_p"], top_k=k, temperature=params["temperature"]
  )
  return getattr(stored, field)


def _top_k(k, field, inputs, params):
  return getattr(sequence.sparse_teacher_from_logits(inputs[0], k), field)


_TRUNCATE, _TOP_K = (
  Program(
    {f"{field}{k}": functools.partial(fn, k, field) for k in TOP_K for field in ("logprobs", "ids")}
  )
  for fn in (_truncated, _top_k)
)


def _truncate(data, dtype, *, nucleus=True):
  logits, _ = data.draw(_logit_pair(TOKENS, LARGEST[dtype]), label="logits")
  logits = _on_grid(logits, dtype)
  params = {}
  if nucleus:
    top_p = st.sampled_from([1e-6, 0.5, 0.95, 1.0]) | st.floats(1e-6, 1.0)
    params = _draw_params(data, {"top_p": top_p, "temperature": TEMPERATURE})
  program = _TRUNCATE if nucleus else _TOP_K
  # The unused slots (id -1) are exactly the -inf log-probabilities.
  outputs, _ = _compiled(program)((jnp.asarray(logits),), params)

  def stored_log_probabilities(logprobs):
    assert np.all(logprobs[np.isfinite(logprobs)] <= 1e-6), logprobs

  expect = {
    f"logprobs{k}": Expect(
      neg_inf_entries=np.asarray(outputs[f"ids{k}"]) < 0, invariant=stored_log_probabilities
    )
    for k in TOP_K
  }
  return Example(program, (logits,), params, expect=expect)


TRANSFORMS = {
  "standardize": _standardize,
  "soft_rank": _soft_rank,
  "dkd_warmup_factor": _dkd_warmup_factor,
  "reduce_loss": _reduce_loss,
  "adaptive_avg_pool2d": _adaptive_avg_pool2d,
  "soft_cap": _soft_cap_example,
  "slice_vocab": _slice_vocab,
  "truncate_teacher": _truncate,
  "sparse_teacher_from_logits": functools.partial(_truncate, nucleus=False),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@_FUZZ
@hypothesis.given(data=st.data())
def test_transforms(name, data):
  _run(TRANSFORMS[name], data)


# ----------------------------------------------------------------------------------------------
# Feature losses: NHWC maps (spatial mismatch in both directions) and [B, S, D] hidden states.
# ----------------------------------------------------------------------------------------------
STUDENT_MAP = (2, 4, 4, 3)
SMALLER, LARGER = (2, 2, 2, 5), (2, 8, 8, 2)


def _map_loss(loss, teacher, kwargs, inputs, params):
  """`loss(student, teacher)` on inputs (student, smaller teacher, larger teacher)."""
  return loss(inputs[0], inputs[teacher], **kwargs, **params)


def _map_program(loss, option, values):
  return Program(
    {
      f"{option}{value}/{name}": functools.partial(_map_loss, loss, i, {option: value})
      for value in values
      for i, name in ((1, "smaller"), (2, "larger"))
    }
  )


_FITNET = Program({"loss": lambda inputs, params: feature.fitnet(*inputs)})
_ATTENTION_TRANSFER = _map_program(feature.attention_transfer, "p", (1, 2, 4))
_NST = _map_program(feature.nst, "degree", (1, 2, 3))
_VID = Program(
  {
    "same": lambda inputs, params: feature.vid(inputs[0], inputs[1], inputs[3]),
    "larger": lambda inputs, params: feature.vid(inputs[0], inputs[2], inputs[3]),
  }
)
_REVIEW_HCL = Program(
  {"loss": lambda inputs, params: feature.review_hcl(*inputs, level_decay=params["level_decay"])}
)


def _maps(data, teacher_shapes):
  student = data.draw(_features(STUDENT_MAP), label="student")
  teachers = tuple(data.draw(_features(shape), label="teacher") for shape in teacher_shapes)
  return (student, *teachers)


def _hidden_program(loss):
  return Program(
    {
      "all": lambda inputs, params: loss(inputs[0], inputs[1]),
      "masked": lambda inputs, params: loss(inputs[2], inputs[3], params["mask"]),
    }
  )


_HIDDEN_PROGRAMS = {
  "hidden_mse": _hidden_program(feature.hidden_mse),
  "hidden_cosine": _hidden_program(feature.hidden_cosine),
}


def _hidden(name):
  def build(data, dtype):
    student, teacher = data.draw(_feature_pairs([((2, 3, 4), (2, 3, 4))]), label="hidden")
    mask = data.draw(_mask((2, 3)), label="mask")
    unscored = np.broadcast_to(~mask[..., None], student.shape)
    return Example(
      _HIDDEN_PROGRAMS[name],
      (student, teacher, student, teacher),
      {"mask": mask},
      masked=(None, None, unscored, unscored),
      expect={"masked": Expect(zero=not mask.any())},
    )

  return build


FEATURE_LOSSES = {
  "fitnet": lambda data, dtype: Example(
    _FITNET, data.draw(_feature_pairs([(STUDENT_MAP, STUDENT_MAP)])), {}
  ),
  "attention_transfer": lambda data, dtype: Example(
    _ATTENTION_TRANSFER, _maps(data, (SMALLER, LARGER)), {}
  ),
  "nst": lambda data, dtype: Example(
    _NST,
    _maps(data, (SMALLER, LARGER)),
    _draw_params(data, {"offset": st.sampled_from([0.0, 1.0])}),
  ),
  "vid": lambda data, dtype: Example(
    _VID,
    (
      *data.draw(_feature_pairs([(SMALLER, SMALLER)])),
      data.draw(_features((2, 4, 4, 5))),
      data.draw(hnp.arrays(np.float32, (5,), elements=st.floats(-1e4, 1e4, width=32))),
    ),
    {},
  ),
  "review_hcl": lambda data, dtype: Example(
    _REVIEW_HCL,
    data.draw(_feature_pairs([(STUDENT_MAP, STUDENT_MAP)])),
    _draw_params(data, {"level_decay": st.sampled_from([0.0, 0.5, 1.0])}),
  ),
  "hidden_mse": _hidden("hidden_mse"),
  "hidden_cosine": _hidden("hidden_cosine"),
}


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
@_FUZZ
@hypothesis.given(data=st.data())
def test_feature_losses(name, data):
  _run(FEATURE_LOSSES[name], data)


# ----------------------------------------------------------------------------------------------
# Relation losses: [B, ...] embeddings, B = 1 where the math allows.
# ----------------------------------------------------------------------------------------------
def _pair_loss(loss, i, inputs, params):
  """`loss` of the i-th (student, teacher) pair of the inputs."""
  return loss(inputs[2 * i], inputs[2 * i + 1], **params)


def _relation(loss, student_dims, teacher_dims, batches=(1, 3), hparams=None):
  program = Program(
    {f"batch{b}": functools.partial(_pair_loss, loss, i) for i, b in enumerate(batches)}
  )

  def build(data, dtype):
    shapes = [((b, *student_dims), (b, *teacher_dims)) for b in batches]
    inputs = data.draw(_feature_pairs(shapes), label="embeddings")
    return Example(program, inputs, _draw_params(data, hparams or {}))

  return build


def _unit_rows(embeddings):
  """L2-normalised rows (zero rows stay zero), as CRD's `Embed` heads give them."""
  norms = np.linalg.norm(embeddings.astype(np.float64), axis=-1, keepdims=True)
  return (embeddings / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _crd_output(i, batch, field, inputs, params):
  """The loss or an updated memory bank of CRD on the i-th (student, teacher) pair."""
  loss, memory = relation.crd(
    inputs[2 * i],
    inputs[2 * i + 1],
    params["memory"],
    params[f"index{batch}"],
    params[f"contrast{batch}"],
    temperature=params["temperature"],
    momentum=params["momentum"],
  )
  return loss if field == "loss" else getattr(memory, field)


_CRD = Program(
  {
    f"batch{batch}/{field}": functools.partial(_crd_output, i, batch, field)
    for i, batch in enumerate((1, 3))
    for field in ("loss", "student_bank", "teacher_bank")
  }
)


def _crd(data, dtype):
  embeddings = data.draw(_feature_pairs([((1, 4), (1, 4)), ((3, 4), (3, 4))]), label="embeddings")
  key = jax.random.key(data.draw(st.integers(0, 2**16), label="seed"), impl="rbg")
  memory = relation.crd_memory_init(key, 8, 4)
  if data.draw(st.booleans(), label="normalizer_set"):  # unset (-1): set from this batch
    normalizer = jnp.float32(data.draw(st.floats(1e-3, 1e3), label="normalizer"))
    memory = memory._replace(student_normalizer=normalizer, teacher_normalizer=normalizer)
  params = {"memory": memory}
  for batch in (1, 3):
    index = jnp.arange(batch, dtype=jnp.int32)
    params[f"index{batch}"] = index
    params[f"contrast{batch}"] = relation.crd_sample_contrast_index(key, index, 8, 5)
  crd_temperature = st.sampled_from([0.05, 0.07]) | st.floats(0.05, 1.0)
  params |= _draw_params(data, {"temperature": crd_temperature, "momentum": UNIT})
  return Example(_CRD, tuple(_unit_rows(e) for e in embeddings), params)


RELATION_LOSSES = {
  "similarity_preserving": _relation(relation.similarity_preserving, (2, 2, 3), (2, 2, 5)),
  "rkd": _relation(
    relation.rkd, (4,), (3,), hparams={"distance_weight": WEIGHT, "angle_weight": WEIGHT}
  ),
  "pkt": _relation(relation.pkt, (4,), (3,)),
  "correlation_congruence": _relation(relation.correlation_congruence, (4,), (4,), (2, 3)),
  "crd": _crd,
}


@pytest.mark.parametrize("name", sorted(RELATION_LOSSES))
@_FUZZ
@hypothesis.given(data=st.data())
def test_relation_losses(name, data):
  _run(RELATION_LOSSES[name], data)


# ----------------------------------------------------------------------------------------------
# Sequence losses: per-token divergences under a [B, S] mask, sparse teachers, chunked heads.
# ----------------------------------------------------------------------------------------------
def _scored_inputs(data, dtype, largest=1e15):
  """(student, teacher, mask [B, S], unscored entries [B, S, V])."""
  student, teacher = data.draw(_logit_pair(TOKENS, min(largest, LARGEST[dtype])), label="logits")
  mask = data.draw(_mask(TOKENS[:-1]), label="mask")
  return student, teacher, mask, np.broadcast_to(~mask[..., None], TOKENS)


DIVERGENCES = {"kd": logit.kd, "jsd": logit.jsd}


def _sequence_loss(divergence, count, inputs, params):
  return sequence.sequence_loss(
    divergence,
    *inputs,
    params["mask"],
    num_tokens=params["num_tokens"] if count else None,
    temperature=params["temperature"],
  )


def _per_token_divergence(divergence, inputs, params):
  return sequence.per_token_divergence(
    divergence, *inputs, params["mask"], temperature=params["temperature"]
  )


_SEQUENCE_LOSS = Program(
  {
    f"{name}/num_tokens{count}": functools.partial(_sequence_loss, divergence, count)
    for name, divergence in DIVERGENCES.items()
    for count in (False, True)
  }
)
_PER_TOKEN_DIVERGENCE = Program(
  {name: functools.partial(_per_token_divergence, d) for name, d in DIVERGENCES.items()}
)


def _per_token(composed):
  def build(data, dtype):
    student, teacher, mask, unscored = _scored_inputs(data, dtype)
    params = {"mask": mask} | _draw_params(
      data, {"temperature": TEMPERATURE, "num_tokens": st.floats(1.0, 1e4)}
    )
    if composed:
      program, expect = _SEQUENCE_LOSS, Expect(zero=not mask.any())
    else:
      program = _PER_TOKEN_DIVERGENCE
      expect = Expect(zero=not mask.any(), zero_entries=~mask)
    return Example(program, (student, teacher), params, masked=(unscored, unscored), default=expect)

  return build


_TOKEN_MEAN = Program(
  {
    "mask": lambda inputs, params: sequence.token_mean(inputs[0], params["mask"]),
    "num_tokens": lambda inputs, params: sequence.token_mean(
      inputs[0], params["mask"], num_tokens=params["num_tokens"]
    ),
  }
)


def _token_mean(data, dtype):
  per_token = data.draw(_logits((2, 3), 1e4), label="per_token")
  mask = data.draw(_mask((2, 3)), label="mask")
  params = {"mask": mask} | _draw_params(data, {"num_tokens": st.floats(1.0, 1e4)})
  return Example(
    _TOKEN_MEAN, (per_token,), params, masked=(~mask,), default=Expect(zero=not mask.any())
  )


_CROSS_ENTROPY = Program(
  {
    "per_token": lambda inputs, params: sequence.per_token_cross_entropy(
      inputs[0], params["targets"], params["mask"]
    ),
    "sequence": lambda inputs, params: sequence.sequence_cross_entropy(
      inputs[0], params["targets"], params["mask"]
    ),
  }
)


def _cross_entropy(data, dtype):
  logits, _, mask, unscored = _scored_inputs(data, dtype)
  # A scored target has a finite logit (its cross-entropy is +inf otherwise); others are -100.
  targets = np.where(mask, np.argmax(np.isfinite(logits), axis=-1), -100).astype(np.int32)
  return Example(
    _CROSS_ENTROPY,
    (logits,),
    {"targets": targets, "mask": mask},
    masked=(unscored,),
    expect={
      "per_token": Expect(zero=not mask.any(), zero_entries=~mask),
      "sequence": Expect(zero=not mask.any()),
    },
  )


def _sparse_topk_kd_variant(form, missing, inputs, params):
  return sequence.sparse_topk_kd(
    inputs[0],
    sequence.SparseTeacher(params["ids"], params["logprobs"]),
    form=form,
    missing=missing,
    temperature=params["temperature"],
    teacher_temperature=params["teacher_temperature"],
    # The KL at the student's default temperature (the distillation one), the cross-entropy at
    # its own.
    student_temperature=params["student_temperature"] if form == "cross_entropy" else None,
    reduction="none",
  )


_SPARSE_TOPK_KD = Program(
  {
    f"{form}/{missing}": functools.partial(_sparse_topk_kd_variant, form, missing)
    for form in ("kl", "cross_entropy")
    for missing in ("renormalize", "residual")
  }
)


def _sparse_topk_kd(data, dtype):
  # A stored teacher id always has a finite student logit (the KL is +inf where q = 0 < p, and the
  # sparse loss keeps every stored id): -inf padding is shared. At most the last class is padding,
  # so the student keeps mass outside the k = 3 stored ids (and see the test below).
  student, teacher = data.draw(
    _logit_pair(TOKENS, min(1e4, LARGEST[dtype]), neg_inf=False), label="logits"
  )
  padding = np.zeros(TOKENS, bool)
  padding[..., -1] = data.draw(hnp.arrays(np.bool_, TOKENS[:-1]), label="padding")
  student, teacher = np.where(padding, -np.inf, student), np.where(padding, -np.inf, teacher)
  temperatures = ("temperature", "teacher_temperature", "student_temperature")
  params = _draw_params(data, dict.fromkeys(temperatures, TEMPERATURE))
  stored = sequence.truncate_teacher(
    jnp.asarray(teacher),
    top_p=data.draw(st.sampled_from([0.5, 1.0]), label="top_p"),
    top_k=3,
    temperature=params["teacher_temperature"],
  )
  ids = np.array(stored.ids)
  if data.draw(st.booleans(), label="repeated_id"):
    ids[..., -1] = ids[..., 0]
  params |= {"ids": ids, "logprobs": stored.logprobs}
  return Example(_SPARSE_TOPK_KD, (student,), params)


def test_sparse_residual_student_without_mass_outside_the_teacher():
  # The student's only finite class is the teacher's only stored id: no mass outside it.
  student = jnp.array([[0.0, -jnp.inf, -jnp.inf]])
  teacher = sequence.SparseTeacher(jnp.array([[0, -1]]), jnp.array([[0.0, -jnp.inf]]))
  value, grad = _jit(
    jax.value_and_grad(lambda s: sequence.sparse_topk_kd(s, teacher, missing="residual"))
  )(student)
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def _heads(data, teacher_width):
  student_hidden = data.draw(_features((2, 3, 4), 1e2), label="student_hidden")
  teacher_hidden = data.draw(_features((2, 3, teacher_width), 1e2), label="teacher_hidden")
  scale = data.draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0]), label="unembed_scale")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
  student_unembed = (scale * rng.standard_normal((4, 7))).astype(np.float32)
  teacher_unembed = (scale * rng.standard_normal((teacher_width, 7))).astype(np.float32)
  mask = data.draw(_mask((2, 3)), label="mask")
  return student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask


_CHUNKED_KD = Program(
  {
    "kd": lambda inputs, params: chunked.chunked_kd(
      *inputs, params["mask"], chunk_size=4, temperature=params["temperature"]
    )
  }
)


def _chunked_kd(data, dtype):
  *heads, mask = _heads(data, 5)
  params = {"mask": mask} | _draw_params(data, {"temperature": TEMPERATURE})
  return Example(_CHUNKED_KD, tuple(heads), params, default=Expect(zero=not mask.any()))


def _chunked_lm_loss_terms(inputs, params):
  """[total, ce, kd]: the loss and its two terms (under stop_gradient) from one call."""
  total, terms = chunked.chunked_lm_loss(
    chunked.LMHead(*inputs, params["cap"]),
    params["mask"],
    targets=params["targets"],
    teacher=sequence.SparseTeacher(params["ids"], params["logprobs"]),
    chunk_size=4,
    temperature=params["temperature"],
  )
  return jnp.stack([total, terms["ce"], terms["kd"]])


_CHUNKED_LM_LOSS = Program({"total_ce_kd": _chunked_lm_loss_terms})


def _chunked_lm_loss(data, dtype):
  student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask = _heads(data, 5)
  stored = sequence.truncate_teacher(
    jnp.einsum("bsd,dv->bsv", teacher_hidden, teacher_unembed), top_p=0.9, top_k=3
  )
  targets = data.draw(hnp.arrays(np.int32, (2, 3), elements=st.integers(0, 6)), label="targets")
  params = {"mask": mask, "targets": targets, "ids": stored.ids, "logprobs": stored.logprobs}
  params |= _draw_params(data, {"cap": st.floats(1.0, 100.0), "temperature": TEMPERATURE})
  return Example(
    _CHUNKED_LM_LOSS,
    (student_hidden, student_unembed),
    params,
    default=Expect(zero=not mask.any()),
  )


SEQUENCE_LOSSES = {
  "sequence_loss": _per_token(composed=True),
  "per_token_divergence": _per_token(composed=False),
  "token_mean": _token_mean,
  "sequence_cross_entropy": _cross_entropy,
  "per_token_cross_entropy": _cross_entropy,
  "sparse_topk_kd": _sparse_topk_kd,
  "chunked_kd": _chunked_kd,
  "chunked_lm_loss": _chunked_lm_loss,
}


@pytest.mark.parametrize("name", sorted(SEQUENCE_LOSSES))
@_FUZZ
@hypothesis.given(data=st.data())
def test_sequence_losses(name, data):
  _run(SEQUENCE_LOSSES[name], data)


# ----------------------------------------------------------------------------------------------
# Regressions: the problems the fuzzing found, as fixed inputs (the fuzzing may not redraw them).
# ----------------------------------------------------------------------------------------------
# q = 0 < p in the second class, p = 0 < q in the third: a mixture endpoint (w = 0 or 1) sums two
# -inf terms, whose logaddexp gradient is NaN.
_DISJOINT = (
  np.array([[0.0, -np.inf, 1.0]], np.float32),
  np.array([[0.0, 1.0, -np.inf]], np.float32),
)
# A converged student: p ≈ q, both nearly one-hot, tails near 1e-35 (akl's gaps ~1e-38).
_CONVERGED = (
  np.array([[0.0, -80.5, -200.0]], np.float32),
  np.array([[0.0, -80.0, -200.0]], np.float32),
)
REGRESSIONS = {
  "skew_kl_alpha_0": (functools.partial(logit.skew_kl, alpha=0.0), _DISJOINT),
  "skew_kl_alpha_1": (functools.partial(logit.skew_kl, alpha=1.0), _DISJOINT),
  "skew_reverse_kl_alpha_0": (functools.partial(logit.skew_reverse_kl, alpha=0.0), _DISJOINT),
  "skew_reverse_kl_alpha_1": (functools.partial(logit.skew_reverse_kl, alpha=1.0), _DISJOINT),
  "jsd_traced_beta_0": (lambda s, t: logit.jsd(s, t, beta=jnp.float32(0.0)), _DISJOINT),
  "jsd_traced_beta_1": (lambda s, t: logit.jsd(s, t, beta=jnp.float32(1.0)), _DISJOINT),
  "akl_converged": (logit.akl, _CONVERGED),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression_finite_gradients(name):
  loss, inputs = REGRESSIONS[name]
  value, grads = _jit(jax.value_and_grad(loss, argnums=(0, 1)))(*inputs)
  assert np.isfinite(value)
  for grad, x in zip(grads, inputs, strict=True):
    assert np.all(np.isfinite(grad)), grad
    assert np.all(np.asarray(grad)[np.isneginf(x)] == 0.0), grad


def test_regression_large_values():
  x = np.array([[3.0, -1.0, 0.5, 2.0, -4.0]], np.float32)
  standardize, soft_rank = _jit(logit.standardize), _jit(logit.soft_rank)
  # standardize: squares of 1e20 overflowed float32 and every output was 0.
  np.testing.assert_allclose(standardize(1e20 * x), standardize(x), rtol=1e-6)
  # soft_rank: s - (s - rho) lost rho (even ranks at 1e8, zeros at 1e12); ties of huge values.
  hard = np.argsort(np.argsort(x, -1), -1) + 1.0
  for scale in (1e8, 1e12, 1e30):
    np.testing.assert_array_equal(soft_rank(scale * x), hard)
  ties = np.array([[1e30, 1e30, 1e30, -1e30, 5.0]], np.float32)
  np.testing.assert_array_equal(soft_rank(ties), [[4.0, 4.0, 4.0, 1.0, 2.0]])


def test_regression_dkd_gradient_of_bfloat16_logits_is_rounded_once():
  # dkd cast each bfloat16 logit to float32 twice and summed the two gradients in bfloat16.
  s, t = _CONVERGED[0] * 0.01, _CONVERGED[1] * 0.01
  labels = jnp.array([1])
  grad = _jit(jax.grad(lambda z: logit.dkd(z, t, labels)))
  exact = np.asarray(grad(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32)))
  low = np.asarray(grad(jnp.asarray(s, jnp.bfloat16)), np.float32)
  np.testing.assert_array_equal(low, exact.astype(jnp.bfloat16).astype(np.float32))


@pytest.mark.parametrize("loss", [feature.hidden_mse, feature.hidden_cosine])
def test_regression_hidden_garbage_at_unscored_tokens(loss):
  # The mask multiplied the squared error after it: 0 * nan = nan, in the value and gradient.
  rng = np.random.default_rng(0)
  student, teacher = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
  mask = np.array([[True, False, True], [False, True, False]])
  garbage = np.where(mask[..., None], student, np.nan).astype(np.float32)
  value_and_grad = _jit(jax.value_and_grad(loss))
  value, grad = value_and_grad(garbage, teacher, mask)
  np.testing.assert_allclose(value, value_and_grad(student, teacher, mask)[0], rtol=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0.0)


# ----------------------------------------------------------------------------------------------
# Invalid concrete hyperparameters raise a ValueError naming the argument and the value.
# ----------------------------------------------------------------------------------------------
_L = np.zeros((2, 5), np.float32)
_MAP = np.zeros((2, 4, 4, 3), np.float32)
_EMBED = np.zeros((3, 4), np.float32)
_MEMORY = relation.crd_memory_init(jax.random.key(0, impl="rbg"), 8, 4)
_INDEX = jnp.arange(3, dtype=jnp.int32)
CALLS = {
  "kd": lambda **kw: logit.kd(_L, _L, **kw),
  "reverse_kl": lambda **kw: logit.reverse_kl(_L, _L, **kw),
  "soft_cross_entropy": lambda **kw: logit.soft_cross_entropy(_L, _L, **kw),
  "tvd": lambda **kw: logit.tvd(_L, _L, **kw),
  "jsd": lambda **kw: logit.jsd(_L, _L, **kw),
  "skew_kl": lambda **kw: logit.skew_kl(_L, _L, **kw),
  "skew_reverse_kl": lambda **kw: logit.skew_reverse_kl(_L, _L, **kw),
  "akl": lambda **kw: logit.akl(_L, _L, **kw),
  "dkd": lambda **kw: logit.dkd(_L, _L, np.zeros(2, np.int32), **kw),
  "dkd_warmup_factor": lambda **kw: logit.dkd_warmup_factor(**{"epoch": 1.0, **kw}),
  "dist": lambda **kw: logit.dist(_L, _L, **kw),
  "correlation_kd": lambda **kw: logit.correlation_kd(_L, _L, **kw),
  "soft_rank": lambda **kw: logit.soft_rank(_L, **kw),
  "standardize": lambda **kw: logit.standardize(_L, **kw),
  "adaptive_avg_pool2d": lambda **kw: feature.adaptive_avg_pool2d(_MAP, **kw),
  "attention_transfer": lambda **kw: feature.attention_transfer(_MAP, _MAP, **kw),
  "nst": lambda **kw: feature.nst(_MAP, _MAP, **kw),
  "vid": lambda **kw: feature.vid(_MAP, _MAP, np.zeros(3, np.float32), **kw),
  "review_hcl": lambda **kw: feature.review_hcl(_MAP, _MAP, **kw),
  "hidden_cosine": lambda **kw: feature.hidden_cosine(_EMBED[None], _EMBED[None], **kw),
  "similarity_preserving": lambda **kw: relation.similarity_preserving(_MAP, _MAP, **kw),
  "rkd": lambda **kw: relation.rkd(_EMBED, _EMBED, **kw),
  "pkt": lambda **kw: relation.pkt(_EMBED, _EMBED, **kw),
  "crd": lambda **kw: relation.crd(
    _EMBED, _EMBED, _MEMORY, _INDEX, jnp.zeros((3, 6), jnp.int32), **kw
  ),
  "crd_memory_init": lambda **kw: relation.crd_memory_init(
    jax.random.key(0, impl="rbg"), **{"n_data": 8, "feat_dim": 4, **kw}
  ),
  "crd_sample_contrast_index": lambda **kw: relation.crd_sample_contrast_index(
    jax.random.key(0, impl="rbg"), _INDEX, **{"n_data": 8, "num_negatives": 5, **kw}
  ),
}
_BAD = {
  "temperature": (0.0, -1.0, np.nan, np.inf, jnp.float32(0.0)),
  "unit": (-0.1, 1.5, np.nan),
  "weight": (-1.0, np.nan, np.inf),
  "floor": (0.0, -1e-8, np.nan),
  "integer": (0, 1.5),
  "count": (-1, 0.5),
}
INVALID = {
  "kd": {"temperature": "temperature"},
  "reverse_kl": {"temperature": "temperature"},
  "soft_cross_entropy": {"temperature": "temperature"},
  "tvd": {"temperature": "temperature"},
  "jsd": {"beta": "unit", "temperature": "temperature"},
  "skew_kl": {"alpha": "unit", "temperature": "temperature"},
  "skew_reverse_kl": {"alpha": "unit", "temperature": "temperature"},
  "akl": {"head_threshold": "unit", "temperature": "temperature"},
  "dkd": {"alpha": "weight", "beta": "weight", "temperature": "temperature"},
  "dkd_warmup_factor": {"warmup_epochs": "temperature", "epoch": "weight"},
  "dist": {"beta": "weight", "gamma": "weight", "temperature": "temperature", "epsilon": "floor"},
  "correlation_kd": {
    "pearson_weight": "weight",
    "spearman_weight": "weight",
    "temperature": "temperature",
    "regularization_strength": "temperature",
    "epsilon": "floor",
  },
  "soft_rank": {"regularization_strength": "temperature"},
  "standardize": {"ddof": "count", "epsilon": "floor"},
  "adaptive_avg_pool2d": {"output_size": "integer"},
  "attention_transfer": {"p": "integer", "eps": "floor"},
  "nst": {"degree": "integer", "eps": "floor"},
  "vid": {"eps": "floor"},
  "review_hcl": {"level_decay": "weight"},
  "hidden_cosine": {"eps": "floor"},
  "similarity_preserving": {"eps": "floor"},
  "rkd": {
    "distance_weight": "weight",
    "angle_weight": "weight",
    "smooth_l1_beta": "temperature",
    "eps": "floor",
  },
  "pkt": {"eps": "floor"},
  "crd": {"temperature": "temperature", "momentum": "unit", "eps": "floor"},
  "crd_memory_init": {"n_data": "integer", "feat_dim": "integer"},
  "crd_sample_contrast_index": {"n_data": "integer", "num_negatives": "integer"},
}
# Arguments outside the shared kinds above.
EXTRA_INVALID = [
  ("dkd", "gt_logit_offset", -1.0),
  ("dkd", "gt_logit_offset", np.nan),
  ("correlation_kd", "pearson_weight", np.array([1.0, -0.5], np.float32)),
  ("nst", "offset", np.inf),
  ("review_hcl", "pool_sizes", (4, 0)),
  ("adaptive_avg_pool2d", "output_size", (2, 0)),
]
INVALID_CASES = [
  (function, argument, value)
  for function, arguments in INVALID.items()
  for argument, kind in arguments.items()
  for value in _BAD[kind]
] + EXTRA_INVALID


@pytest.mark.parametrize(
  "function, argument, value", INVALID_CASES, ids=[f"{f}-{a}-{v!r}" for f, a, v in INVALID_CASES]
)
def test_invalid_hyperparameter_raises(function, argument, value):
  with pytest.raises(ValueError, match=f"^{function}: {argument} must be ") as raised:
    jax.eval_shape(lambda: CALLS[function](**{argument: value}))
  assert str(raised.value).endswith(f"got {value!r}")


BOUNDARIES = [
  ("jsd", {"beta": 0.0}),
  ("jsd", {"beta": 1}),
  ("skew_kl", {"alpha": 1.0}),
  ("skew_reverse_kl", {"alpha": 0.0}),
  ("akl", {"head_threshold": 1.0}),
  ("dkd", {"alpha": 0.0, "beta": 0, "gt_logit_offset": np.inf}),
  ("dist", {"beta": 0.0, "gamma": 0.0}),
  ("correlation_kd", {"pearson_weight": np.zeros(2, np.float32), "spearman_weight": 0.0}),
  ("standardize", {"ddof": 0}),
  ("review_hcl", {"level_decay": 0.0}),
  ("rkd", {"distance_weight": 0.0, "angle_weight": 0.0}),
  ("crd", {"momentum": 1.0}),
  ("crd", {"momentum": 0}),
  ("dkd_warmup_factor", {"epoch": 0}),
]


@pytest.mark.parametrize("function, kwargs", BOUNDARIES)
def test_boundary_hyperparameters_are_accepted(function, kwargs):
  jax.eval_shape(lambda: CALLS[function](**kwargs))


def test_traced_hyperparameters_are_not_checked():
  """Under a trace the value is unknown: the caller checks config values before compiling."""
  for function, argument in [("kd", "temperature"), ("jsd", "beta"), ("crd", "momentum")]:
    jax.eval_shape(lambda v, f=function, a=argument: CALLS[f](**{a: v}), jnp.float32(-1.0))


def test_correlation_congruence_needs_two_examples():
  with pytest.raises(ValueError, match="batch of 2 or more, got 1"):
    relation.correlation_congruence(_EMBED[:1], _EMBED[:1])


# ----------------------------------------------------------------------------------------------
# The tables cover every public name.
# ----------------------------------------------------------------------------------------------
NOT_LOSSES = {
  "Reduction": "a type",
  "CRDMemory": "CRD's state type, fuzzed through crd",
  "SparseTeacher": "a container type, fuzzed through sparse_topk_kd and chunked_lm_loss",
  "LMHead": "a container type, fuzzed through chunked_lm_loss",
  "crd_memory_init": "a state constructor, its output fuzzed through crd",
  "crd_sample_contrast_index": "an index sampler, its output fuzzed through crd",
  "bool_mask": "an argument guard",
  "check_vocab_sizes": "an argument guard",
  "check_top_k": "an argument guard",
  "sparse_id_dtype": "storage layout (integers)",
  "sparse_bytes_per_token": "storage layout (integers)",
  "encode_sparse_teacher": "host-side storage codec (numpy)",
  "decode_sparse_teacher": "host-side storage codec (numpy)",
}
FAMILIES = (LOGIT_LOSSES, TRANSFORMS, FEATURE_LOSSES, RELATION_LOSSES, SEQUENCE_LOSSES)


def test_every_public_name_is_fuzzed():
  public = {
    name
    for name, value in vars(jaxkd.losses).items()
    if not name.startswith("_") and not inspect.ismodule(value)
  }
  fuzzed = set().union(*FAMILIES)
  assert not fuzzed & set(NOT_LOSSES)
  missing = public - fuzzed - set(NOT_LOSSES)
  assert not missing, f"public names of jaxkd.losses without a fuzz case: {sorted(missing)}"
  stale = (fuzzed | set(NOT_LOSSES)) - public
  assert not stale, f"fuzz cases of names jaxkd.losses does not export: {sorted(stale)}"
