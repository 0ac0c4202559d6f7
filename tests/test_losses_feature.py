"""Feature and relation losses: golden values against torch transcriptions of the references.

The torch functions below transcribe RepDistiller (distiller_zoo/*.py, crd/*.py), mdistiller
(distillers/ReviewKD.py hcl_loss) and DistillKit (lossfuncs/hidden_state.py) on NCHW tensors; ours
get the NHWC arrays. Values must agree to 1e-5 relative, student gradients to 1e-4.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.losses import feature
from jaxkd.losses import relation

RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7


def _key(seed):
  # 'rbg' keys: XLA:CPU compiles threefry slowly, and the losses accept any key type.
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# torch transcriptions of the references (NCHW)
# ----------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
F = torch.nn.functional


def _nchw(x):
  nchw = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))) if x.ndim == 4 else x
  return torch.tensor(nchw, requires_grad=True)


def _nhwc_grad(t):
  g = t.grad.numpy()
  return np.transpose(g, (0, 2, 3, 1)) if g.ndim == 4 else g


def _pool_larger(f_s, f_t):
  s_h, t_h = f_s.shape[2], f_t.shape[2]
  if s_h > t_h:
    f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
  elif s_h < t_h:
    f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
  return f_s, f_t


def torch_at(g_s, g_t, p=2):
  def at(f):
    return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

  losses = []
  for f_s, f_t in zip(g_s, g_t):
    f_s, f_t = _pool_larger(f_s, f_t)
    losses.append((at(f_s) - at(f_t)).pow(2).mean())
  return sum(losses)


def torch_sp(g_s, g_t):
  losses = []
  for f_s, f_t in zip(g_s, g_t):
    bsz = f_s.shape[0]
    f_s, f_t = f_s.view(bsz, -1), f_t.view(bsz, -1)
    g_s_ = F.normalize(torch.mm(f_s, f_s.t()))
    g_t_ = F.normalize(torch.mm(f_t, f_t.t()))
    diff = g_t_ - g_s_
    losses.append((diff * diff).view(-1, 1).sum(0) / (bsz * bsz))
  return sum(losses)[0]


def torch_pdist(e, squared=False, eps=1e-12):
  e_square = e.pow(2).sum(dim=1)
  prod = e @ e.t()
  res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
  if not squared:
    res = res.sqrt()
  res = res.clone()
  res[range(len(e)), range(len(e))] = 0
  return res


def torch_rkd(f_s, f_t, w_d=25, w_a=50):
  student, teacher = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
  with torch.no_grad():
    t_d = torch_pdist(teacher)
    t_d = t_d / t_d[t_d > 0].mean()
  d = torch_pdist(student)
  d = d / d[d > 0].mean()
  loss_d = F.smooth_l1_loss(d, t_d)
  with torch.no_grad():
    td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
    norm_td = F.normalize(td, p=2, dim=2)
    t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
  sd = student.unsqueeze(0) - student.unsqueeze(1)
  norm_sd = F.normalize(sd, p=2, dim=2)
  s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
  loss_a = F.smooth_l1_loss(s_angle, t_angle)
  return w_d * loss_d + w_a * loss_a


def torch_pkt(output_net, target_net, eps=1e-7):
  output_net = output_net.view(output_net.shape[0], -1)
  target_net = target_net.view(target_net.shape[0], -1)
  output_net = output_net / (torch.sqrt(torch.sum(output_net**2, dim=1, keepdim=True)) + eps)
  target_net = target_net / (torch.sqrt(torch.sum(target_net**2, dim=1, keepdim=True)) + eps)
  model_similarity = (torch.mm(output_net, output_net.transpose(0, 1)) + 1.0) / 2.0
  target_similarity = (torch.mm(target_net, target_net.transpose(0, 1)) + 1.0) / 2.0
  model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
  target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
  return torch.mean(
    target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps))
  )


def torch_nst(g_s, g_t):
  def poly_kernel(a, b):
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

  losses = []
  for f_s, f_t in zip(g_s, g_t):
    f_s, f_t = _pool_larger(f_s, f_t)
    f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
    losses.append(
      poly_kernel(f_t, f_t).mean().detach()
      + poly_kernel(f_s, f_s).mean()
      - 2 * poly_kernel(f_s, f_t).mean()
    )
  return sum(losses)


def torch_cc(f_s, f_t):
  delta = torch.abs(f_s - f_t)
  return torch.mean((delta[:-1] * delta[1:]).sum(1))


def torch_vid(pred_mean, target, log_scale, eps=1e-5):
  if pred_mean.shape[2] < target.shape[2]:
    target = F.adaptive_avg_pool2d(target, (pred_mean.shape[2], pred_mean.shape[2]))
  pred_var = (torch.log(1.0 + torch.exp(log_scale)) + eps).view(1, -1, 1, 1)
  return torch.mean(0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var)))


def torch_hcl(fstudent, fteacher):
  loss_all = 0.0
  for fs, ft in zip(fstudent, fteacher):
    h = fs.shape[2]
    loss = F.mse_loss(fs, ft, reduction="mean")
    cnt, tot = 1.0, 1.0
    for level in [4, 2, 1]:
      if level >= h:
        continue
      cnt /= 2.0
      loss = (
        loss
        + F.mse_loss(
          F.adaptive_avg_pool2d(fs, (level, level)), F.adaptive_avg_pool2d(ft, (level, level))
        )
        * cnt
      )
      tot += cnt
    loss_all = loss_all + loss / tot
  return loss_all


def torch_hidden(kind, student_layers, teacher_layers, mask):
  mask = mask.unsqueeze(-1)
  total = 0.0
  for student_h, teacher_h in zip(student_layers, teacher_layers):
    if kind == "mse":
      layer = ((student_h - teacher_h) ** 2 * mask).sum() / (mask.sum() * student_h.shape[-1])
    else:
      cosine = F.cosine_similarity(student_h, teacher_h, dim=-1)
      layer = ((1 - cosine) * mask.squeeze(-1)).sum() / mask.sum()
    total = total + layer
  return total / len(student_layers)


class TorchContrastMemory:
  """RepDistiller crd/memory.py ContrastMemory.forward with given idx, + ContrastLoss ×2."""

  def __init__(self, memory_v1, memory_v2, n_data, temperature=0.07, momentum=0.5):
    self.memory_v1, self.memory_v2 = torch.tensor(memory_v1), torch.tensor(memory_v2)
    self.params = torch.tensor([0.0, temperature, -1.0, -1.0, momentum])
    self.n_data = n_data

  def contrast_loss(self, x, eps=1e-7):
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(self.n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz

  def __call__(self, v1, v2, y, idx):
    k = idx.shape[1] - 1
    t, z_v1, z_v2, momentum = (
      self.params[1].item(),
      self.params[2].item(),
      self.params[3].item(),
      self.params[4].item(),
    )
    batch, input_size = v1.size(0), self.memory_v1.size(1)
    output_size = self.memory_v1.size(0)
    weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
    out_v2 = torch.exp(
      torch.div(
        torch.bmm(weight_v1.view(batch, k + 1, input_size), v2.view(batch, input_size, 1)), t
      )
    )
    weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
    out_v1 = torch.exp(
      torch.div(
        torch.bmm(weight_v2.view(batch, k + 1, input_size), v1.view(batch, input_size, 1)), t
      )
    )
    if z_v1 < 0:
      self.params[2] = out_v1.mean() * output_size
      z_v1 = self.params[2].clone().detach().item()
    if z_v2 < 0:
      self.params[3] = out_v2.mean() * output_size
      z_v2 = self.params[3].clone().detach().item()
    out_v1, out_v2 = torch.div(out_v1, z_v1), torch.div(out_v2, z_v2)
    with torch.no_grad():
      l_pos = torch.index_select(self.memory_v1, 0, y.view(-1))
      l_pos.mul_(momentum).add_(torch.mul(v1, 1 - momentum))
      self.memory_v1.index_copy_(0, y, l_pos.div(l_pos.pow(2).sum(1, keepdim=True).pow(0.5)))
      ab_pos = torch.index_select(self.memory_v2, 0, y.view(-1))
      ab_pos.mul_(momentum).add_(torch.mul(v2, 1 - momentum))
      self.memory_v2.index_copy_(0, y, ab_pos.div(ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)))
    return (self.contrast_loss(out_v1.squeeze(-1)) + self.contrast_loss(out_v2.squeeze(-1)))[0]


# ----------------------------------------------------------------------------------------------
# golden values
# ----------------------------------------------------------------------------------------------
def _check_value_and_student_grad(ours, reference, student, teacher):
  """ours(student, teacher) on NHWC arrays vs reference on NCHW torch tensors."""
  student_t, teacher_t = _nchw(student), _nchw(teacher)
  expected = reference(student_t, teacher_t)
  expected.backward()
  value, grad = jax.jit(jax.value_and_grad(ours))(jnp.asarray(student), jnp.asarray(teacher))
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, expected.item(), rtol=RTOL)
  np.testing.assert_allclose(grad, _nhwc_grad(student_t), rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize(
  "in_size,out_size",
  [((8, 8), (4, 4)), ((7, 7), (4, 4)), ((5, 7), (2, 3)), ((6, 6), (1, 1)), ((4, 4), (4, 4))],
)
def test_adaptive_avg_pool2d_matches_torch(in_size, out_size):
  x = _normal(0, (2, *in_size, 3))
  expected = F.adaptive_avg_pool2d(_nchw(x), out_size).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(
    feature.adaptive_avg_pool2d(jnp.asarray(x), out_size), expected, rtol=RTOL, atol=1e-7
  )


def test_fitnet_matches_mse_loss():
  _check_value_and_student_grad(
    feature.fitnet, F.mse_loss, _normal(0, (4, 4, 4, 6)), _normal(1, (4, 4, 4, 6))
  )


@pytest.mark.parametrize("student_size,teacher_size", [(8, 8), (8, 4), (4, 8)])
def test_attention_transfer_matches_repdistiller(student_size, teacher_size):
  """Two stages, the second a strided slice (the same elements in NHWC and NCHW order)."""

  def ours(s, t):
    return feature.attention_transfer([s, s[:, ::2, ::2, :2]], [t, t[:, ::2, ::2, :4]])

  def reference(s, t):
    return torch_at([s, s[:, :2, ::2, ::2]], [t, t[:, :4, ::2, ::2]])

  student = _normal(0, (3, student_size, student_size, 6))
  teacher = _normal(1, (3, teacher_size, teacher_size, 10))
  _check_value_and_student_grad(ours, reference, student, teacher)


def test_similarity_preserving_matches_repdistiller():
  _check_value_and_student_grad(
    lambda s, t: relation.similarity_preserving([s], [t]),
    lambda s, t: torch_sp([s], [t]),
    _normal(0, (6, 4, 4, 3)),
    _normal(1, (6, 2, 2, 8)),
  )


def test_rkd_matches_repdistiller():
  # Feature maps: the flattening order (NHWC vs NCHW) does not change distances or angles.
  _check_value_and_student_grad(
    relation.rkd, torch_rkd, _normal(2, (5, 2, 2, 3)), _normal(3, (5, 2, 2, 4))
  )


def test_pkt_matches_repdistiller():
  _check_value_and_student_grad(relation.pkt, torch_pkt, _normal(0, (6, 5)), _normal(1, (6, 9)))


@pytest.mark.parametrize("student_size,teacher_size", [(8, 4), (2, 4)])
def test_nst_matches_repdistiller(student_size, teacher_size):
  _check_value_and_student_grad(
    lambda s, t: feature.nst([s], [t]),
    lambda s, t: torch_nst([s], [t]),
    _normal(0, (3, student_size, student_size, 5)),
    _normal(1, (3, teacher_size, teacher_size, 7)),
  )


def test_correlation_congruence_matches_repdistiller_both_grads():
  student, teacher = _normal(0, (6, 8)), _normal(1, (6, 8))
  student_t, teacher_t = _nchw(student), _nchw(teacher)
  expected = torch_cc(student_t, teacher_t)
  expected.backward()
  value, grads = jax.jit(jax.value_and_grad(relation.correlation_congruence, argnums=(0, 1)))(
    student, teacher
  )
  np.testing.assert_allclose(value, expected.item(), rtol=RTOL)
  np.testing.assert_allclose(grads[0], student_t.grad.numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL)
  np.testing.assert_allclose(grads[1], teacher_t.grad.numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("teacher_size", [4, 8])
def test_vid_matches_repdistiller(teacher_size):
  log_scale = np.log(np.expm1(_normal(2, (6,)) ** 2 + 0.5)).astype(np.float32)
  _check_value_and_student_grad(
    lambda s, t: feature.vid(s, t, log_scale),
    lambda s, t: torch_vid(s, t, torch.tensor(log_scale)),
    _normal(0, (3, 4, 4, 6)),
    _normal(1, (3, teacher_size, teacher_size, 6)),
  )


def test_vid_rejects_larger_prediction():
  with pytest.raises(ValueError, match="pool the student"):
    feature.vid(jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 4, 4, 2)), jnp.zeros(2))


@pytest.mark.parametrize("sizes", [(8, 4), (7, 2), (1, 3)])
def test_review_hcl_matches_mdistiller(sizes):
  """8: levels 4, 2, 1; 7: non-divisible pooling to 4; 2: only level 1; 1: no level."""
  student = [_normal(i, (2, h, h, 3)) for i, h in enumerate(sizes)]
  teacher = [_normal(10 + i, (2, h, h, 3)) for i, h in enumerate(sizes)]
  student_t, teacher_t = [_nchw(s) for s in student], [_nchw(t) for t in teacher]
  expected = torch_hcl(student_t, teacher_t)
  expected.backward()
  value, grads = jax.jit(jax.value_and_grad(feature.review_hcl))(student, teacher)
  np.testing.assert_allclose(value, expected.item(), rtol=RTOL)
  for grad, reference in zip(grads, student_t):
    np.testing.assert_allclose(grad, _nhwc_grad(reference), rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_losses_match_distillkit(kind):
  ours = {"mse": feature.hidden_mse, "cosine": feature.hidden_cosine}[kind]
  student = [_normal(i, (2, 5, 8)) for i in range(2)]
  teacher = [_normal(10 + i, (2, 5, 8)) for i in range(2)]
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  student_t = [torch.tensor(s, requires_grad=True) for s in student]
  expected = torch_hidden(kind, student_t, [torch.tensor(t) for t in teacher], torch.tensor(mask))
  expected.backward()
  value, grads = jax.jit(jax.value_and_grad(ours))(student, teacher, mask.astype(bool))
  np.testing.assert_allclose(value, expected.item(), rtol=RTOL)
  for grad, reference in zip(grads, student_t):
    np.testing.assert_allclose(grad, reference.grad.numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_hidden_losses_without_valid_tokens_are_zero():
  hidden = jnp.ones((2, 3, 4))
  for loss in (feature.hidden_mse, feature.hidden_cosine):
    assert jax.jit(loss)(hidden, -hidden, jnp.zeros((2, 3))) == 0.0


def test_crd_matches_repdistiller_over_two_steps():
  """Same contrast indices on both steps: Z is set on step 1 then fixed; the banks move."""
  n_data, feat_dim, batch, num_negatives = 32, 8, 4, 6
  memory = relation.crd_memory_init(_key(0), n_data, feat_dim)
  index = jnp.array([3, 17, 5, 30])
  contrast_index = relation.crd_sample_contrast_index(_key(1), index, n_data, num_negatives)
  reference = TorchContrastMemory(
    np.asarray(memory.student_bank), np.asarray(memory.teacher_bank), n_data
  )
  loss_and_grads = jax.jit(jax.value_and_grad(relation.crd, argnums=(0, 1), has_aux=True))
  for step in range(2):
    student = feature.l2_normalize(jnp.asarray(_normal(2 * step, (batch, feat_dim))))
    teacher = feature.l2_normalize(jnp.asarray(_normal(2 * step + 1, (batch, feat_dim))))
    student_t = torch.tensor(np.asarray(student), requires_grad=True)
    teacher_t = torch.tensor(np.asarray(teacher), requires_grad=True)
    expected = reference(
      student_t,
      teacher_t,
      torch.tensor(np.asarray(index), dtype=torch.long),
      torch.tensor(np.asarray(contrast_index), dtype=torch.long),
    )
    expected.backward()
    (value, memory), grads = loss_and_grads(student, teacher, memory, index, contrast_index)
    np.testing.assert_allclose(value, expected.item(), rtol=RTOL)
    np.testing.assert_allclose(grads[0], student_t.grad.numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL)
    np.testing.assert_allclose(grads[1], teacher_t.grad.numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL)
    np.testing.assert_allclose(memory.student_normalizer, reference.params[2].item(), rtol=RTOL)
    np.testing.assert_allclose(memory.teacher_normalizer, reference.params[3].item(), rtol=RTOL)
    for bank, reference_bank in (
      (memory.student_bank, reference.memory_v1),
      (memory.teacher_bank, reference.memory_v2),
    ):
      np.testing.assert_allclose(bank, reference_bank.numpy(), rtol=RTOL, atol=1e-7)


def test_crd_memory_init_follows_contrast_memory():
  memory = relation.crd_memory_init(_key(0), 1000, 12)
  stdv = 1.0 / np.sqrt(12 / 3)
  for bank in (memory.student_bank, memory.teacher_bank):
    assert bank.shape == (1000, 12) and bank.dtype == jnp.float32
    assert -stdv <= bank.min() and bank.max() <= stdv and bank.max() > 0.95 * stdv
  assert not np.array_equal(memory.student_bank, memory.teacher_bank)
  assert memory.student_normalizer == -1 and memory.teacher_normalizer == -1


def test_crd_sample_contrast_index():
  index = jnp.array([0, 7, 19])
  sample = jax.jit(relation.crd_sample_contrast_index, static_argnums=(2, 3))
  uniform = sample(_key(0), index, 20, 50)
  assert uniform.shape == (3, 51) and uniform.dtype == jnp.int32
  np.testing.assert_array_equal(uniform[:, 0], index)
  assert uniform.min() >= 0 and uniform.max() < 20
  labels = jnp.arange(20) % 4
  by_class = sample(_key(0), index, 20, 15, dataset_labels=labels)
  np.testing.assert_array_equal(by_class[:, 0], index)
  for row, example in zip(np.asarray(by_class), np.asarray(index)):
    negatives = row[1:]
    assert len(set(negatives.tolist())) == 15  # without replacement
    assert np.all(np.asarray(labels)[negatives] != labels[example])


# ----------------------------------------------------------------------------------------------
# properties shared by every loss
# ----------------------------------------------------------------------------------------------
_LOG_SCALE = jnp.full((6,), 0.5)
_CRD_MEMORY = relation.crd_memory_init(_key(0), 16, 6)
_CRD_INDEX = jnp.array([1, 4, 9, 12])
_CRD_CONTRAST = relation.crd_sample_contrast_index(_key(1), _CRD_INDEX, 16, 5)


def _crd_loss(student, teacher):
  return relation.crd(student, teacher, _CRD_MEMORY, _CRD_INDEX, _CRD_CONTRAST)[0]


# name: (loss(student, teacher), student shape, teacher shape, zero when student == teacher)
LOSSES = {
  "fitnet": (feature.fitnet, (4, 4, 4, 6), (4, 4, 4, 6), True),
  "attention_transfer": (feature.attention_transfer, (4, 8, 8, 6), (4, 4, 4, 3), True),
  "nst": (feature.nst, (4, 4, 4, 6), (4, 4, 4, 3), True),
  "vid": (lambda s, t: feature.vid(s, t, _LOG_SCALE), (4, 4, 4, 6), (4, 4, 4, 6), False),
  "review_hcl": (feature.review_hcl, (4, 8, 8, 6), (4, 8, 8, 6), True),
  "hidden_mse": (feature.hidden_mse, (4, 5, 6), (4, 5, 6), True),
  "hidden_cosine": (feature.hidden_cosine, (4, 5, 6), (4, 5, 6), True),
  "similarity_preserving": (relation.similarity_preserving, (4, 2, 2, 6), (4, 2, 2, 3), True),
  "rkd": (relation.rkd, (4, 6), (4, 3), True),
  "pkt": (relation.pkt, (4, 6), (4, 3), True),
  "correlation_congruence": (relation.correlation_congruence, (4, 6), (4, 6), True),
  "crd": (_crd_loss, (4, 6), (4, 6), False),
}


# Compiled once per loss and shape, shared by the tests below (compilation dominates their time).
_JITTED = {name: jax.jit(case[0]) for name, case in LOSSES.items()}
_JITTED_GRAD = {
  name: jax.jit(jax.value_and_grad(case[0], argnums=(0, 1))) for name, case in LOSSES.items()
}


def _inputs(name):
  _, student_shape, teacher_shape, _ = LOSSES[name]
  return jnp.asarray(_normal(0, student_shape)), jnp.asarray(_normal(1, teacher_shape))


@pytest.mark.parametrize("name", [n for n, case in LOSSES.items() if case[3]])
def test_zero_when_student_equals_teacher(name):
  student, _ = _inputs(name)
  np.testing.assert_allclose(_JITTED[name](student, student), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_jit_matches_eager(name):
  student, teacher = _inputs(name)
  np.testing.assert_allclose(
    _JITTED[name](student, teacher), LOSSES[name][0](student, teacher), rtol=1e-6
  )


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("degenerate", ["zeros", "identical_samples"])
def test_finite_value_and_grads_on_degenerate_inputs(name, degenerate):
  _, student_shape, teacher_shape, _ = LOSSES[name]
  if degenerate == "zeros":
    student, teacher = jnp.zeros(student_shape), jnp.zeros(teacher_shape)
  else:  # every sample of the batch identical: zero pairwise distances
    student = jnp.broadcast_to(jnp.asarray(_normal(0, student_shape[1:])), student_shape)
    teacher = jnp.broadcast_to(jnp.asarray(_normal(1, teacher_shape[1:])), teacher_shape)
  value, grads = _JITTED_GRAD[name](student, teacher)
  assert np.isfinite(value)
  for grad in grads:
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", LOSSES)
def test_bfloat16_inputs_give_float32(name):
  student, teacher = _inputs(name)
  student16, teacher16 = student.astype(jnp.bfloat16), teacher.astype(jnp.bfloat16)
  value = _JITTED[name](student16, teacher16)
  assert value.dtype == jnp.float32
  # Internal math is float32: the same as the float32 loss of the rounded inputs ...
  rounded = _JITTED[name](student16.astype(jnp.float32), teacher16.astype(jnp.float32))
  np.testing.assert_allclose(value, rounded, rtol=1e-6)
  # ... and close to the float32 loss of the unrounded ones.
  np.testing.assert_allclose(value, _JITTED[name](student, teacher), rtol=5e-2, atol=1e-4)


def test_stage_lists_sum():
  student, teacher = _inputs("attention_transfer")
  two_stages = jax.jit(feature.attention_transfer)([student, student], [teacher, teacher])
  np.testing.assert_allclose(
    two_stages, 2 * _JITTED["attention_transfer"](student, teacher), rtol=1e-6
  )


def test_vmap_over_a_population():
  """Batch-level losses compose with vmap (e.g. a population of students)."""
  student, teacher = _inputs("rkd")
  students = jnp.stack([student, 2 * student, student + 1])
  per_member = jax.jit(jax.vmap(functools.partial(relation.rkd, teacher_embed=teacher)))(students)
  expected = [_JITTED["rkd"](s, teacher) for s in students]
  np.testing.assert_allclose(per_member, expected, rtol=1e-5)
