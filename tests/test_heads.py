"""Multi-sphere heads and loss against numpy references written from the formulas (float64).

Compile time dominates: the heads of every kind are compiled together, once per (N, normalization)
and input shape (`kinds_fn`), and shared by the tests.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multiface_jax.heads import MultiSphereHead, multi_sphere_loss, sphere_accuracy

DIM, NUM_CLASSES, BATCH, SCALE = 16, 7, 6, 64.0

# name -> (kind, head options); the options double as the numpy reference's margins.
KIND_CASES = {
    'softmax': ('softmax', {}),
    'cosface': ('cosface', {'margin': 0.35}),
    'arcface': ('arcface', {'margin': 0.5}),
    'combined_arc': ('combined', {'combined_margins': (1.0, 0.5, 0.0)}),
    'combined_mix': ('combined', {'combined_margins': (0.9, 0.4, 0.15)}),
    'combined_sphere': ('combined', {'combined_margins': (1.35, 0.1, 0.05)}),
}


# ----------------------------------------------------------------------------- numpy reference

def np_cosines(embeddings, kernel, normalization):
  """(N, B, C) cosines: loop over spheres, slice, optionally renormalise, unit columns."""
  num_spheres, sub_dim, _ = kernel.shape
  out = []
  for n in range(num_spheres):
    part = embeddings[:, n * sub_dim:(n + 1) * sub_dim]
    if normalization == 'per_sphere':
      part = part / np.sqrt((part ** 2).sum(axis=1, keepdims=True))
    weights = kernel[n] / np.sqrt((kernel[n] ** 2).sum(axis=0, keepdims=True))
    out.append(np.clip(part @ weights, -1.0, 1.0))
  return np.stack(out)


def np_target(c, kind, margin=0.5, combined_margins=(1.0, 0.5, 0.0)):
  """Target cosine with margin for one scalar c, written in angles with math.acos."""
  if kind == 'softmax':
    return c
  if kind == 'cosface':
    return c - margin
  theta = math.acos(c)
  if kind == 'arcface':
    if c <= math.cos(math.pi - margin):
      return c - margin * math.sin(margin)
    return math.cos(theta + margin)
  m1, m2, m3 = combined_margins
  if m1 * theta + m2 >= math.pi:  # the angle left [0, pi]: CosFace-like fallback
    past_pi = math.pi - (math.pi - m2) / m1
    return c - past_pi * math.sin(past_pi) - m3
  return math.cos(m1 * theta + m2) - m3


def np_logits(embeddings, kernel, labels, normalization, kind, **margins):
  cos = np_cosines(np.asarray(embeddings, np.float64), np.asarray(kernel, np.float64), normalization)
  logits = cos.copy()
  for n in range(cos.shape[0]):
    for b, y in enumerate(labels):
      logits[n, b, y] = np_target(cos[n, b, y], kind, **margins)
  return SCALE * logits


def unit_rows(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_case(seed, num_spheres, batch=BATCH, dim=DIM, num_classes=NUM_CLASSES):
  rng = np.random.default_rng(seed)
  embeddings = unit_rows(rng.normal(size=(batch, dim))).astype(np.float32)
  # Non-unit columns: the head must normalise them in the forward pass.
  kernel = (2.5 * rng.normal(size=(num_spheres, dim // num_spheres, num_classes))).astype(np.float32)
  labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
  return embeddings, kernel, labels


def make_head(case, num_spheres, normalization, **extra):
  kind, options = KIND_CASES[case]
  return MultiSphereHead(NUM_CLASSES, num_spheres=num_spheres, kind=kind, scale=SCALE,
                         normalization=normalization, **options, **extra)


# ----------------------------------------------------------------------------- logits

@functools.lru_cache(maxsize=None)
def kinds_fn(num_spheres, normalization):
  """Jitted (kernel, embeddings, labels) -> {case: margin logits} for KIND_CASES, plus 'plain':
  the logits without labels (the same for every kind: nothing there depends on it)."""
  heads = {case: make_head(case, num_spheres, normalization) for case in KIND_CASES}

  @jax.jit
  def run(kernel, embeddings, labels):
    params = {'params': {'kernel': kernel}}
    logits = {case: head.apply(params, embeddings, labels) for case, head in heads.items()}
    logits['plain'] = heads['arcface'].apply(params, embeddings)
    return logits
  return run


def all_kinds_logits(num_spheres, normalization, kernel, embeddings, labels):
  outputs = kinds_fn(num_spheres, normalization)(jnp.asarray(kernel), jnp.asarray(embeddings),
                                                  jnp.asarray(labels))
  return {name: np.asarray(logits) for name, logits in outputs.items()}


@pytest.mark.parametrize('num_spheres', [1, 2, 4])
@pytest.mark.parametrize('normalization', ['global', 'per_sphere'])
def test_logits_match_numpy(normalization, num_spheres):
  embeddings, kernel, labels = random_case(num_spheres, num_spheres)
  if normalization == 'per_sphere':
    embeddings = embeddings * 3.0  # per-sphere ignores the overall scale of the input
  outputs = all_kinds_logits(num_spheres, normalization, kernel, embeddings, labels)
  for case, (kind, options) in KIND_CASES.items():
    expected = np_logits(embeddings, kernel, labels, normalization, kind, **options)
    assert outputs[case].shape == (num_spheres, BATCH, NUM_CLASSES)
    assert outputs[case].dtype == np.float32
    np.testing.assert_allclose(outputs[case], expected, rtol=1e-5, atol=2e-4, err_msg=case)
  np.testing.assert_allclose(outputs['plain'], SCALE * np_cosines(embeddings, kernel, normalization),
                             rtol=1e-5, atol=2e-4)


def test_hand_values_at_known_angles():
  """Class 0 along e0 (norm 2: normalised in the forward pass), class 1 along e1, the others
  orthogonal; row b sits at angle theta_b from class 0 in the (e0, e1) plane."""
  thetas = np.array([0.0, 0.3, 1.0, 1.5, 2.5, 2.9])
  embeddings = np.zeros((BATCH, DIM), np.float32)
  embeddings[:, 0], embeddings[:, 1] = np.cos(thetas), np.sin(thetas)
  kernel = np.zeros((1, DIM, NUM_CLASSES), np.float32)
  kernel[0, :NUM_CLASSES, :] = np.eye(NUM_CLASSES)
  kernel[0, 0, 0] = 2.0
  labels = np.zeros(BATCH, np.int32)
  m1, m2, m3 = 1.35, 0.1, 0.05
  sphere_past_pi = math.pi - (math.pi - m2) / m1  # combined fallback from theta >= 2.253
  expected = {
      'softmax': [math.cos(t) for t in thetas],
      'cosface': [math.cos(t) - 0.35 for t in thetas],
      # fallback from theta >= pi - 0.5 = 2.64
      'arcface': [math.cos(t + 0.5) if t < 2.64 else math.cos(t) - 0.5 * math.sin(0.5)
                  for t in thetas],
      'combined_mix': [math.cos(0.9 * t + 0.4) - 0.15 for t in thetas],  # never past pi
      'combined_sphere': [math.cos(m1 * t + m2) - m3 if t < 2.25
                          else math.cos(t) - sphere_past_pi * math.sin(sphere_past_pi) - m3
                          for t in thetas],
  }
  expected['combined_arc'] = expected['arcface']
  assert math.cos(2.9 + 0.5) > math.cos(2.9) - 0.5 * math.sin(0.5) + 0.05  # branches differ
  outputs = all_kinds_logits(1, 'global', kernel, embeddings, labels)
  for case, targets in expected.items():
    logits = outputs[case][0]
    np.testing.assert_allclose(logits[:, 0], SCALE * np.array(targets), atol=2e-4, err_msg=case)
    np.testing.assert_allclose(logits[:, 1], SCALE * np.sin(thetas), atol=2e-4, err_msg=case)
    np.testing.assert_allclose(logits[:, 2:], 0.0, atol=1e-5, err_msg=case)


@pytest.mark.parametrize('normalization', ['global', 'per_sphere'])
def test_fallback_branch_taken(normalization):
  """Targets far past pi - m use the CosFace-like fallback, near ones the exact margin."""
  num_spheres, sub_dim, margin = 2, DIM // 2, 0.5
  rng = np.random.default_rng(3)
  kernel = rng.normal(size=(num_spheres, sub_dim, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)
  w_hat = kernel / np.linalg.norm(kernel, axis=1, keepdims=True)
  signs = np.array([-1.0, 1.0] * (BATCH // 2))  # away from / towards the target column
  rows = []
  for sign, y in zip(signs, labels):
    parts = [sign * w_hat[n, :, y] + 0.1 * rng.normal(size=sub_dim) for n in range(num_spheres)]
    # 'global': sphere 0 dominant, so its slice norm (close to 1) lets c pass cos(pi - m).
    rows.append(np.concatenate([parts[0], 0.05 * parts[1]] if normalization == 'global' else parts))
  embeddings = unit_rows(np.stack(rows)).astype(np.float32)

  outputs = all_kinds_logits(num_spheres, normalization, kernel, embeddings, labels)
  cos = np_cosines(embeddings.astype(np.float64), kernel.astype(np.float64), normalization)
  m1, m2, m3 = KIND_CASES['combined_sphere'][1]['combined_margins']
  for b in range(BATCH):
    c, y = cos[0, b, labels[b]], labels[b]
    if signs[b] < 0:  # sphere 0 of every "away" row is in both fallbacks: check them by hand
      assert c <= math.cos(math.pi - margin) and m1 * math.acos(c) + m2 > math.pi
      arc = c - margin * math.sin(margin)
      assert abs(arc - math.cos(math.acos(c) + margin)) > 0.05  # and the branches differ here
      past_pi = math.pi - (math.pi - m2) / m1
      sphere = c - past_pi * math.sin(past_pi) - m3
    else:
      assert c > 0.5
      arc = math.cos(math.acos(c) + margin)
      sphere = math.cos(m1 * math.acos(c) + m2) - m3
    for case, target in [('arcface', arc), ('combined_arc', arc), ('combined_sphere', sphere)]:
      np.testing.assert_allclose(outputs[case][0, b, y], SCALE * target, rtol=1e-5, atol=2e-4,
                                 err_msg=f'{case} row {b}')


def test_vmapped_head_equals_loop_of_single_heads():
  num_spheres = 4
  sub_dim = DIM // num_spheres
  embeddings, kernel, labels = random_case(11, num_spheres)
  for normalization in ['global', 'per_sphere']:
    multi = all_kinds_logits(num_spheres, normalization, kernel, embeddings, labels)
    singles = [all_kinds_logits(1, normalization, kernel[n:n + 1],
                                embeddings[:, n * sub_dim:(n + 1) * sub_dim], labels)
               for n in range(num_spheres)]
    for name in multi:
      for n in range(num_spheres):
        np.testing.assert_allclose(multi[name][n], singles[n][name][0], rtol=1e-6, atol=1e-5,
                                   err_msg=f'{name} sphere {n}')


@pytest.mark.parametrize('num_spheres', [2, 4])
def test_global_and_per_sphere_differ_by_slice_norm_for_softmax(num_spheres):
  embeddings, kernel, labels = random_case(num_spheres, num_spheres)  # as in test_logits_match_numpy
  glob = all_kinds_logits(num_spheres, 'global', kernel, embeddings, labels)['softmax']
  per = all_kinds_logits(num_spheres, 'per_sphere', kernel, embeddings, labels)['softmax']
  slice_norms = np.linalg.norm(embeddings.reshape(BATCH, num_spheres, -1), axis=-1).T  # (N, B)
  assert np.all(slice_norms < 0.999)  # the factor is not trivially 1
  np.testing.assert_allclose(glob, slice_norms[..., None] * per, rtol=1e-5, atol=1e-4)


def test_bf16_embeddings_give_float32_logits():
  embeddings, kernel, labels = random_case(7, 2)
  head = make_head('arcface', 2, 'global')
  emb_bf16 = jnp.asarray(embeddings, jnp.bfloat16)
  logits = jax.jit(head.apply)({'params': {'kernel': jnp.asarray(kernel)}}, emb_bf16,
                               jnp.asarray(labels))
  assert logits.dtype == jnp.float32
  exact = np_logits(np.asarray(emb_bf16.astype(jnp.float32)), kernel, labels, 'global', 'arcface',
                    margin=0.5)
  np.testing.assert_allclose(logits, exact, rtol=1e-5, atol=2e-4)
  total, per_sphere = multi_sphere_loss(logits.astype(jnp.bfloat16), jnp.asarray(labels))
  assert total.dtype == jnp.float32 and per_sphere.dtype == jnp.float32


@pytest.mark.parametrize('num_spheres', [1, 2, 4])
def test_init_gives_unit_columns_in_one_kernel(num_spheres):
  head = MultiSphereHead(NUM_CLASSES, num_spheres=num_spheres, kind='cosface')
  # jit + 'rbg' key: compiling threefry for each kernel shape costs seconds on CPU.
  params = jax.jit(head.init)(jax.random.key(0, impl='rbg'), jnp.zeros((2, DIM)),
                              jnp.zeros((2,), jnp.int32))
  assert list(params) == ['params'] and list(params['params']) == ['kernel']
  kernel = np.asarray(params['params']['kernel'])
  assert kernel.shape == (num_spheres, DIM // num_spheres, NUM_CLASSES)
  assert kernel.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(kernel, axis=1), 1.0, rtol=1e-6)
  assert np.all(np.abs(kernel) <= 1.0)
  assert len(np.unique(np.round(kernel, 6))) == kernel.size  # independent draws, no repeats


def test_bad_configuration_raises():
  emb, lab = jnp.zeros((2, 10)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match='divisible'):
    MultiSphereHead(5, num_spheres=4).init(jax.random.key(0), emb, lab)
  with pytest.raises(ValueError, match='kind'):
    MultiSphereHead(5, kind='sphereface').init(jax.random.key(0), emb, lab)
  with pytest.raises(ValueError, match='normalization'):
    MultiSphereHead(5, normalization='slice').init(jax.random.key(0), emb, lab)
  with pytest.raises(ValueError, match='labels'):
    MultiSphereHead(5).init(jax.random.key(0), emb, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match='combined_margins'):
    MultiSphereHead(5, kind='combined', combined_margins=(0.0, 0.5, 0.0)).init(
        jax.random.key(0), emb, lab)


# ----------------------------------------------------------------------------- gradients

def test_straight_through_gradient_is_the_no_margin_gradient():
  embeddings, kernel, labels = random_case(2, 1)
  cotangent = np.random.default_rng(0).normal(size=(1, BATCH, NUM_CLASSES)).astype(np.float32)
  heads = {'straight': make_head('arcface', 1, 'global', straight_through=True),
           'analytic': make_head('arcface', 1, 'global'),
           'plain': make_head('softmax', 1, 'global')}

  @jax.jit
  def logits_and_grads(kernel, embeddings):
    """Logits and gradients of sum(cotangent * logits) w.r.t. (kernel, embeddings) per head."""
    def objective(head, kernel, embeddings):
      logits = head.apply({'params': {'kernel': kernel}}, embeddings, labels)
      return jnp.sum(cotangent * logits), logits
    return {name: jax.grad(objective, argnums=(1, 2), has_aux=True)(head, kernel, embeddings)
            for name, head in heads.items()}
  out = logits_and_grads(jnp.asarray(kernel), jnp.asarray(embeddings))

  # Same values: straight-through only changes the backward pass.
  np.testing.assert_allclose(out['straight'][1], out['analytic'][1], rtol=1e-6)
  for a, b in zip(out['straight'][0], out['plain'][0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  g_analytic = out['analytic'][0][1]
  assert not np.allclose(g_analytic, out['plain'][0][1], atol=1e-2)

  # Analytic d logit / d e (N = 1, global, so dc/de is the unit column): the target's derivative of
  # cos(theta + m) in c is cos m + c sin m / sqrt(1 - c^2); every other logit has derivative 1.
  m = 0.5
  w_hat = kernel[0].astype(np.float64) / np.linalg.norm(kernel[0], axis=0)
  cos = np.clip(embeddings.astype(np.float64) @ w_hat, -1, 1)
  slope = np.ones_like(cos)
  for b, y in enumerate(labels):
    c = cos[b, y]
    assert c > math.cos(math.pi - m)
    slope[b, y] = math.cos(m) + c * math.sin(m) / math.sqrt(1 - c * c)
  expected = SCALE * (cotangent[0] * slope) @ w_hat.T
  np.testing.assert_allclose(g_analytic, expected, rtol=1e-4, atol=1e-3)


def basis_case(num_spheres, signs):
  """Columns 3 * e_k and embeddings = +-e_y in every slice, so c = +-1 exactly for the target."""
  sub_dim = DIM // num_spheres
  num_basis = min(sub_dim, NUM_CLASSES)
  kernel = np.random.default_rng(1).normal(size=(num_spheres, sub_dim, NUM_CLASSES))
  kernel[:, :, :num_basis] = 3.0 * np.eye(sub_dim)[:, :num_basis]
  labels = np.arange(len(signs)) % num_basis
  embeddings = np.stack([np.tile(s * np.eye(sub_dim)[y], num_spheres) for s, y in zip(signs, labels)])
  return embeddings.astype(np.float32), kernel.astype(np.float32), labels.astype(np.int32)


def column_case(num_spheres, signs):
  """Embeddings = +- a generic normalised column placed in sphere 0 only; the other slices are zero
  (which 'per_sphere' must normalise without NaN)."""
  sub_dim = DIM // num_spheres
  kernel = np.random.default_rng(4).normal(size=(num_spheres, sub_dim, NUM_CLASSES))
  w_hat = kernel / np.linalg.norm(kernel, axis=1, keepdims=True)
  labels = np.arange(len(signs)) % NUM_CLASSES
  embeddings = np.zeros((len(signs), DIM))
  for b, (s, y) in enumerate(zip(signs, labels)):
    embeddings[b, :sub_dim] = s * w_hat[0, :, y]
  return embeddings.astype(np.float32), kernel.astype(np.float32), labels.astype(np.int32)


GRAD_CASES = [('softmax', False), ('cosface', False), ('arcface', False), ('arcface', True),
              ('combined_mix', False), ('combined_sphere', False)]
SIGNS = [1.0, -1.0] * (BATCH // 2)


@pytest.mark.parametrize('normalization', ['global', 'per_sphere'])
def test_finite_gradients_at_cos_plus_minus_one(normalization):
  num_spheres = 2
  heads = {f'{case}{"_straight" if straight else ""}':
           make_head(case, num_spheres, normalization, straight_through=straight)
           for case, straight in GRAD_CASES}

  @jax.jit
  def all_grads(kernel, embeddings, labels):
    def loss(head, kernel, embeddings):
      logits = head.apply({'params': {'kernel': kernel}}, embeddings, labels)
      return multi_sphere_loss(logits, labels)[0]
    return {name: jax.grad(loss, argnums=(1, 2))(head, kernel, embeddings)
            for name, head in heads.items()}

  basis = basis_case(num_spheres, SIGNS)
  cos = all_kinds_logits(num_spheres, normalization, basis[1], basis[0], basis[2])['plain'] / SCALE
  np.testing.assert_array_equal(cos[:, np.arange(BATCH), basis[2]], [SIGNS] * num_spheres)
  for embeddings, kernel, labels in [basis, column_case(num_spheres, SIGNS)]:
    grads = all_grads(jnp.asarray(kernel), jnp.asarray(embeddings), jnp.asarray(labels))
    for name, (g_kernel, g_embeddings) in grads.items():
      assert np.all(np.isfinite(g_kernel)) and np.all(np.isfinite(g_embeddings)), name
      assert np.any(np.asarray(g_embeddings) != 0), name


# ----------------------------------------------------------------------------- loss, accuracy

def test_loss_is_sum_over_spheres_of_mean_cross_entropy():
  rng = np.random.default_rng(9)
  logits = (20 * rng.normal(size=(3, 5, NUM_CLASSES))).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=5).astype(np.int32)
  per_sphere_expected = []
  for n in range(3):
    ce = []
    for b in range(5):
      row = logits[n, b].astype(np.float64)
      top = row.max()
      ce.append(top + math.log(sum(math.exp(v - top) for v in row)) - row[labels[b]])
    per_sphere_expected.append(sum(ce) / 5)
  total, per_sphere = jax.jit(multi_sphere_loss)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(per_sphere, per_sphere_expected, rtol=1e-5)
  np.testing.assert_allclose(total, sum(per_sphere_expected), rtol=1e-5)
  assert per_sphere.shape == (3,) and total.shape == ()


def test_loss_hand_value():
  # One sphere, two classes, logits (0, 0): CE = log 2; second sphere certain and right: CE ~ 0.
  logits = jnp.array([[[0.0, 0.0]], [[0.0, 100.0]]])
  total, per_sphere = multi_sphere_loss(logits, jnp.array([1]))
  np.testing.assert_allclose(per_sphere, [math.log(2.0), 0.0], atol=1e-6)
  np.testing.assert_allclose(total, math.log(2.0), atol=1e-6)


def test_sphere_accuracy():
  logits = jnp.array([
      [[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]],   # 4 / 4 right
      [[0.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 9.0, 0.0]],   # 1 / 4 right
  ])
  labels = jnp.array([0, 1, 2, 0])
  accuracy = sphere_accuracy(logits, labels)
  assert accuracy.dtype == jnp.float32
  np.testing.assert_allclose(accuracy, [1.0, 0.25])


def test_loss_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='labels'):
    multi_sphere_loss(jnp.zeros((2, 4, 3)), jnp.zeros((5,), jnp.int32))
