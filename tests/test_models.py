"""Backbones: parameter counts of the original, layer semantics against numpy, model contract.

Compiling a whole backbone on CPU costs seconds, so the big models are only traced
(`jax.eval_shape`) and MobileFaceNet is compiled a few times with variables filled by numpy.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multiface_jax import models
from multiface_jax.models import iresnet, kernels, layers
from multiface_jax.models.kernels import batchnorm_prelu, convolutions

IMAGE_SHAPE = (1, 112, 112, 3)


def abstract_variables(model, batch_shape=IMAGE_SHAPE):
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(batch_shape, jnp.float32))


def count_params(variables):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables['params']))


@functools.cache
def model_param_count(name):
  return count_params(abstract_variables(models.create_model(name)))


def numpy_variables(abstract, seed=0):
  """Random but well-scaled concrete variables for an abstract tree, without compiling init."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == 'kernel':
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == 'negative_slope':
      value = rng.uniform(0.1, 0.4, size=shape)
    elif name in ('scale', 'var'):
      value = rng.uniform(0.8, 1.2, size=shape)
    else:  # BN bias / mean, Linear bias
      value = rng.normal(size=shape) * 0.1
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


# ---------------------------------------------------------------- parameter counts


def ir_param_count(units, use_se, embedding=512):
  """IR / IR-SE parameter count written out from the architecture (docs/original.md)."""
  bn = lambda c: 2 * c  # scale + bias
  total = 3 * 3 * 3 * 64 + bn(64) + 64  # input conv, BN, PReLU
  in_c = 64
  for depth, n in zip((64, 128, 256, 512), units):
    for u in range(n):
      c = in_c if u == 0 else depth
      if c != depth:
        total += c * depth + bn(depth)  # 1x1 shortcut conv + BN
      total += bn(c) + 9 * c * depth + depth + 9 * depth * depth + bn(depth)
      if use_se:
        total += 2 * depth * (depth // 16)
    in_c = depth
  total += bn(512) + 512 * 7 * 7 * embedding + embedding + bn(embedding)
  return total


@pytest.mark.parametrize('name,expected', [
    ('mobilefacenet', 1_200_512),  # the original's counts (PyTorch parameters())
    ('ir_se50', 43_797_696),
    ('ir_se100', 65_502_016),
])
def test_param_counts_match_original(name, expected):
  assert model_param_count(name) == expected


def mobilefacenet_param_count(width=1.0, embedding=512):
  """MobileFaceNet's parameters from its layer list (docs/original.md), channels times width."""
  c = lambda n: max(8, round(n * width / 8) * 8)
  block = lambda cin, cout, k=1, depthwise=False, prelu=True: (
      k * k * (1 if depthwise else cin) * cout + 2 * cout + (cout if prelu else 0))
  dw = lambda cin, cout, exp: (block(cin, exp) + block(exp, exp, 3, True)
                               + block(exp, cout, prelu=False))
  total = block(3, c(64), 3) + block(c(64), c(64), 3, True) + dw(c(64), c(64), c(128))
  total += 4 * dw(c(64), c(64), c(128)) + dw(c(64), c(128), c(256))
  total += 6 * dw(c(128), c(128), c(256)) + dw(c(128), c(128), c(512))
  total += 2 * dw(c(128), c(128), c(256)) + block(c(128), c(512))
  total += block(c(512), c(512), 7, True, prelu=False) + c(512) * embedding + 2 * embedding
  return total


@pytest.mark.parametrize('width', [1.0, 0.5, 0.75])
def test_mobilefacenet_width_scales_every_layer(width):
  assert mobilefacenet_param_count(1.0) == 1_200_512  # the formula is the original's at width 1
  model = models.create_model('mobilefacenet', width=width)
  assert count_params(abstract_variables(model)) == mobilefacenet_param_count(width)
  variables = abstract_variables(model)
  assert variables['params']['conv1']['conv']['kernel'].shape[-1] == round(64 * width / 8) * 8
  assert variables['params']['linear']['kernel'].shape[-1] == 512
  with pytest.raises(ValueError, match='width must be positive'):
    abstract_variables(models.create_model('mobilefacenet', width=0.0))


def test_ir_param_counts_match_architecture_formula():
  counts = {name: model_param_count(name) for name in ('ir50', 'ir152', 'ir_se50', 'ir_se100')}
  for name, count in counts.items():
    print(f'{name}: {count:,} params')
  for name, depth, use_se in (('ir50', 50, False), ('ir152', 152, False),
                              ('ir_se50', 50, True), ('ir_se100', 100, True)):
    assert counts[name] == ir_param_count(iresnet.UNITS_BY_DEPTH[depth], use_se), name
  # SE adds 2 * d * d/16 per unit: 3 units of 64, 4 of 128, 14 of 256, 3 of 512.
  se_params_50 = (3 * 64**2 + 4 * 128**2 + 14 * 256**2 + 3 * 512**2) // 8
  assert se_params_50 == 222_720
  assert counts['ir_se50'] - counts['ir50'] == se_params_50


def test_parameter_tree_follows_original_module_names():
  mfn = abstract_variables(models.create_model('mobilefacenet'))
  assert mfn['params']['conv1']['conv']['kernel'].shape == (3, 3, 3, 64)
  assert mfn['params']['conv1']['prelu']['negative_slope'].shape == (64,)
  assert mfn['params']['conv_3']['block_3']['conv_dw']['conv']['kernel'].shape == (3, 3, 1, 128)
  assert mfn['params']['conv_6_dw']['conv']['kernel'].shape == (7, 7, 1, 512)
  assert mfn['params']['linear']['kernel'].shape == (512, 512)
  assert mfn['batch_stats']['bn']['mean'].shape == (512,)
  assert set(mfn['params']['conv_4']) == {f'block_{i}' for i in range(6)}

  ir = abstract_variables(models.create_model('ir_se50'))['params']
  assert len([k for k in ir if k.startswith('body_')]) == 24
  assert 'shortcut_layer' not in ir['body_0']  # 64 -> 64: max-pool shortcut, no params
  assert ir['body_3']['shortcut_layer']['conv']['kernel'].shape == (1, 1, 64, 128)
  assert ir['body_3']['res_layer']['se']['fc1']['kernel'].shape == (1, 1, 128, 8)
  assert ir['output_layer']['linear']['kernel'].shape == (512 * 7 * 7, 512)
  assert ir['output_layer']['linear']['bias'].shape == (512,)


# ---------------------------------------------------------------- layers against numpy


def depthwise_numpy(x, kernel, stride, pad):
  """Direct loop over output pixels: out[b,i,j,c] = sum_uv xpad[b,i*s+u,j*s+v,c] * k[u,v,0,c]."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (xp.shape[1] - kh) // stride + 1
  out_w = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i in range(out_h):
    for j in range(out_w):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.einsum('buvc,uvc->bc', patch, kernel[:, :, 0, :])
  return out


@pytest.mark.parametrize('kernel_set', ['xla', 'xla_cpu'])
def test_depthwise_hand_computed_example(kernel_set):
  grid = np.arange(1.0, 10.0).reshape(3, 3)
  x = np.stack([grid, 10 * grid], axis=-1)[None]  # (1, 3, 3, 2)
  kernel = np.zeros((3, 3, 1, 2))
  kernel[:, :, 0, 0] = 1.0  # channel 0: 3x3 box sum
  kernel[0, 0, 0, 1] = 1.0  # channel 1: top-left tap only (no kernel flip, padding reads 0)
  variables = {'params': {'kernel': jnp.asarray(kernel, jnp.float32)}}
  conv = layers.DepthwiseConv2D((3, 3), strides=2, padding=1)
  with kernels.use(kernel_set):  # eagerly: a jit would reuse the trace of the other set
    out = np.asarray(conv.apply(variables, jnp.asarray(x, jnp.float32)))
  # Output pixel (i, j) is centred on input (2i, 2j).
  np.testing.assert_allclose(out[0, :, :, 0], [[1 + 2 + 4 + 5, 2 + 3 + 5 + 6],
                                              [4 + 5 + 7 + 8, 5 + 6 + 8 + 9]])
  np.testing.assert_allclose(out[0, :, :, 1], [[0, 0], [0, 50]])
  np.testing.assert_allclose(out, depthwise_numpy(x, kernel, 2, 1))


DEPTHWISE_CASES = [  # (kernel, stride, padding, input size)
    (3, 1, 1, 9),
    (3, 2, 1, 8),  # even input, stride 2: PyTorch's symmetric padding
    (3, 2, 1, 7),
    (3, 1, 0, 6),
    (7, 1, 0, 7),  # MobileFaceNet's global depthwise conv
    (5, 2, 2, 9),
    (3, 2, 3, 6),  # padding wider than the kernel: the input gradient's spread starts cropped
]


@pytest.mark.parametrize('k,stride,pad,size', DEPTHWISE_CASES)
def test_depthwise_cpu_kernel_agrees_with_xla_in_value_and_gradient(k, stride, pad, size):
  rng = np.random.default_rng(k * 100 + stride * 10 + size)
  # Batch 12: the shifted kernel gradient loops over chunks of 8 images, then the 4 left over.
  x = jnp.asarray(rng.normal(size=(12, size, size, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, 5)), jnp.float32)
  expected = depthwise_numpy(np.asarray(x), np.asarray(kernel), stride, pad)
  cotangent = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)

  @jax.jit
  def outputs_and_grads(x, kernel, cotangent):
    results = {}
    for name, fn in (('lax', convolutions.depthwise_conv_lax),
                     ('shifted', convolutions.depthwise_conv_shifted)):
      conv = functools.partial(fn, strides=(stride, stride), padding=((pad, pad), (pad, pad)))
      out, vjp = jax.vjp(conv, x, kernel)
      results[name] = out, vjp(cotangent)
    return results

  results = outputs_and_grads(x, kernel, cotangent)
  outputs = {name: out for name, (out, _) in results.items()}
  grads = {name: grad for name, (_, grad) in results.items()}
  np.testing.assert_allclose(outputs['shifted'], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outputs['lax'], expected, rtol=1e-5, atol=1e-5)
  for g_lax, g_shifted in zip(grads['lax'], grads['shifted']):
    np.testing.assert_allclose(g_shifted, g_lax, rtol=1e-5, atol=1e-5)


def test_kernel_sets_resolve_by_backend_and_share_parameters():
  x = jnp.zeros((1, 8, 8, 6))
  shapes = {}
  for kernel_set in ('xla', 'xla_cpu'):
    with kernels.use(kernel_set) as resolved:
      assert resolved == kernels.active() == kernel_set
      shapes[kernel_set] = layers.DepthwiseConv2D((3, 3)).init(
          jax.random.key(0), x)['params']['kernel'].shape
  assert shapes == {'xla': (3, 3, 1, 6), 'xla_cpu': (3, 3, 1, 6)}
  with kernels.use('auto') as resolved:
    assert resolved == 'xla_cpu'  # tests run on CPU
  assert kernels.active() == 'xla_cpu'  # outside any backbone: 'auto'
  with pytest.raises(ValueError, match='auto, xla, xla_cpu'):
    with kernels.use('cudnn'):
      pass


def test_tiny_backbone_computes_the_same_function_with_either_kernel_set():
  """The whole network (3-channel and wider 3x3 convolutions, a global depthwise conv, fused
  BatchNorm + PReLU): same embeddings and parameter gradients with XLA's kernels and XLA:CPU's."""
  rng = np.random.default_rng(9)
  images = jnp.asarray(rng.uniform(-1, 1, size=(4, 112, 112, 3)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(4, 512)), jnp.float32)
  results = {}
  for kernel_set in ('xla', 'xla_cpu'):
    model = models.create_model('tiny', kernel_set=kernel_set)  # the set is part of the module
    variables = model.init(jax.random.key(0), images[:1], train=False)

    def embed(params, images, model=model, variables=variables):
      out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                           train=True, mutable=['batch_stats'])
      return out

    out, vjp = jax.vjp(jax.jit(embed), variables['params'], images)
    results[kernel_set] = out, vjp(cotangent)[0]
  np.testing.assert_allclose(results['xla_cpu'][0], results['xla'][0], rtol=1e-4, atol=1e-5)
  for want, got in zip(jax.tree.leaves(results['xla'][1]), jax.tree.leaves(results['xla_cpu'][1])):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_prelu_matches_numpy_and_starts_at_quarter():
  x = np.random.default_rng(0).normal(size=(4, 3, 3, 5)).astype(np.float32)
  prelu = layers.PReLU()
  variables = prelu.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables['params']['negative_slope'], np.full(5, 0.25))
  slopes = np.array([0.0, 0.1, 0.25, -0.5, 1.0], np.float32)
  out = prelu.apply({'params': {'negative_slope': slopes}}, x)
  np.testing.assert_allclose(out, np.where(x >= 0, x, slopes * x), rtol=1e-6)


def test_batchnorm_uses_torch_eps_and_momentum():
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(16, 3)).astype(np.float32)
  bn = layers.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  _, updates = bn.apply(variables, x, mutable=['batch_stats'])
  # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch (Flax stores the biased var).
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * x.var(0), rtol=1e-5)
  stats = {'mean': jnp.zeros(3), 'var': jnp.full(3, 1e-5)}
  out = layers.BatchNorm(use_running_average=True).apply(
      {'params': variables['params'], 'batch_stats': stats}, x)
  np.testing.assert_allclose(out, x / np.sqrt(2e-5), rtol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batchnorm_equals_flax_batchnorm_in_value_statistics_and_gradient(dtype):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(1.5, 2.0, size=(6, 3, 3, 4)), dtype)
  reference = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype)
  ours = layers.BatchNorm(dtype=dtype)
  variables = reference.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x, use_running_average=False)) == \
      jax.tree.map(jnp.shape, variables)
  variables = {'params': {'scale': jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32),
                          'bias': jnp.asarray(rng.normal(size=4), jnp.float32)},
               'batch_stats': {'mean': jnp.asarray(rng.normal(size=4), jnp.float32),
                               'var': jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)}}
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2

  @jax.jit
  def run(variables, x):
    results = {}
    for name, module in (('flax', reference), ('ours', ours)):
      def train(params, x, module=module):
        out, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                    x, use_running_average=False, mutable=['batch_stats'])
        return jnp.sum(out.astype(jnp.float32) * cotangent), (out, updates['batch_stats'])
      grads, (out, stats) = jax.grad(train, (0, 1), has_aux=True)(variables['params'], x)
      eval_out = module.apply(variables, x, use_running_average=True)
      results[name] = out, stats, grads, eval_out
    return results

  results = run(variables, x)
  for expected, actual in zip(jax.tree.leaves(results['flax']), jax.tree.leaves(results['ours'])):
    assert expected.dtype == actual.dtype
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('images_per_chunk', [5, 2])
def test_affine_prelu_equals_autodiff_of_batchnorm_then_prelu(images_per_chunk):
  """5: the whole batch in one chunk; 2: the backward's sums loop over chunks of 2 images of
  the batch of 5 (two in the loop, one after it)."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(0.5, 2.0, size=(5, 5, 5, 6)), jnp.float32)
  multiplier = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
  shift = jnp.asarray(rng.normal(size=6), jnp.float32)
  slope = jnp.asarray(rng.uniform(0.1, 0.4, 6), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def reference(x, multiplier, shift, slope):  # PReLU written as max/min, differentiated by JAX
    y = x * multiplier + shift
    return jnp.maximum(y, 0) + slope * jnp.minimum(y, 0)

  expected, expected_vjp = jax.vjp(reference, x, multiplier, shift, slope)
  fused = functools.partial(batchnorm_prelu.affine_prelu, images_per_chunk=images_per_chunk)
  actual, actual_vjp = jax.vjp(fused, x, multiplier, shift, slope)
  np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
  for want, got in zip(expected_vjp(cotangent), actual_vjp(cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(actual_vjp)(cotangent))
  assert (' scan[' in jaxpr or ' while[' in jaxpr) == (images_per_chunk < len(x))


def test_cpu_kernels_size_the_batchnorm_prelu_chunks_to_the_cache():
  x = jnp.zeros((64, 56, 56, 128), jnp.float32)  # 1.6 MB per image
  assert kernels.chunking.images_per_chunk(x) == 1
  assert kernels.chunking.images_per_chunk(x[:, :28, :28]) == 2  # 401 KB per image
  assert kernels.chunking.images_per_chunk(x[:, :7, :7, :8]) == 668  # more than the batch


def test_conv_block_fused_batchnorm_prelu_equals_separate_layers():
  """ConvBlock (BatchNorm.affine fused into PReLU) == BatchNorm module then PReLU module."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(3, 6, 6, 4)), jnp.float32)
  block = layers.ConvBlock(5, (3, 3), 1, padding=1)
  variables = block.init(jax.random.key(0), x, train=True)
  variables['params']['prelu']['negative_slope'] = jnp.asarray(rng.uniform(0.1, 0.4, 5),
                                                               jnp.float32)

  def separate(params, x):
    conv = layers.Conv2D(5, (3, 3), 1, 1)
    out = conv.apply({'params': params['conv']}, x)
    out, stats = layers.BatchNorm(use_running_average=False).apply(
        {'params': params['bn'], 'batch_stats': variables['batch_stats']['bn']}, out,
        mutable=['batch_stats'])
    slope = params['prelu']['negative_slope']
    return jnp.where(out >= 0, out, slope * out), stats['batch_stats']

  def fused(params, x):
    out, updates = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                               train=True, mutable=['batch_stats'])
    return out, updates['batch_stats']['bn']

  cotangent = jnp.asarray(rng.normal(size=(3, 6, 6, 5)), jnp.float32)
  results = []
  for fn in (separate, fused):
    (out, stats), vjp = jax.vjp(fn, variables['params'], x)
    results.append((out, stats, vjp((cotangent, jax.tree.map(jnp.zeros_like, stats)))))
  for want, got in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def conv_numpy(x, kernel, stride, pad):
  """Dense NHWC convolution by explicit shifted sums (PyTorch padding, HWIO kernel)."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (xp.shape[1] - kh) // stride + 1
  out_w = (xp.shape[2] - kw) // stride + 1
  out = 0
  for u in range(kh):
    for v in range(kw):
      view = xp[:, u:u + stride * (out_h - 1) + 1:stride, v:v + stride * (out_w - 1) + 1:stride]
      out = out + view @ kernel[u, v]
  return out


def bn_numpy(x, p, s):
  return (x - s['mean']) / np.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']


CONV_CASES = [  # (kernel, stride, padding, input size, in channels, out channels)
    (3, 1, 1, 7, 3, 4),  # <= 4 input channels: 'gemm' convolves the patch matrix
    (3, 2, 1, 8, 3, 4),  # even input, stride 2: PyTorch's symmetric padding
    (3, 2, 1, 7, 2, 3),
    (3, 1, 1, 6, 5, 4),  # more channels: XLA's convolution
    (3, 2, 1, 8, 6, 3),
    (1, 1, 0, 5, 4, 6),
    (1, 2, 0, 6, 4, 6),  # IR's strided 1x1 shortcut
    (1, 1, 1, 4, 3, 2),  # a padded 1x1 (not in the models, but the layer accepts it)
]


@pytest.mark.parametrize('k,stride,pad,size,cin,cout', CONV_CASES)
def test_conv_kernels_agree_with_numpy_in_value_and_gradient(k, stride, pad, size, cin, cout):
  rng = np.random.default_rng(k * 1000 + stride * 100 + pad * 10 + size)
  x = rng.normal(size=(2, size, size, cin)).astype(np.float32)
  kernel = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
  expected = conv_numpy(x, kernel, stride, pad)
  cotangent = rng.normal(size=expected.shape).astype(np.float32)

  @jax.jit
  def outputs_and_grads(x, kernel, cotangent):
    results = {}
    for name, fn in (('lax', convolutions.conv2d_lax), ('gemm', convolutions.conv2d_gemm)):
      conv = functools.partial(fn, strides=(stride, stride), padding=((pad, pad), (pad, pad)))
      out, vjp = jax.vjp(conv, x, kernel)
      results[name] = out, vjp(cotangent)
    return results

  results = outputs_and_grads(x, kernel, cotangent)
  for name, (out, _) in results.items():
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=name)
  # The kernel gradient written out: sum over batch and output pixels of window x cotangent.
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = expected.shape[1]
  grad_kernel = np.zeros_like(kernel)
  for u in range(k):
    for v in range(k):
      window = xp[:, u:u + stride * (out_h - 1) + 1:stride, v:v + stride * (out_h - 1) + 1:stride]
      grad_kernel[u, v] = np.einsum('bhwc,bhwo->co', window, cotangent)
  for name, (_, (grad_x, grad_w)) in results.items():
    np.testing.assert_allclose(grad_w, grad_kernel, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(grad_x, results['lax'][1][0], rtol=1e-5, atol=1e-5, err_msg=name)


def test_conv2d_reads_flax_conv_parameters():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
  flax_conv = nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)
  variables = flax_conv.init(jax.random.key(0), x)
  expected = flax_conv.apply(variables, x)
  conv = layers.Conv2D(5, (3, 3), strides=2, padding=1)
  for kernel_set in ('xla', 'xla_cpu'):  # eagerly: a jit would reuse the trace of the other set
    with kernels.use(kernel_set):
      assert jax.tree.map(jnp.shape, conv.init(jax.random.key(0), x)) == \
          jax.tree.map(jnp.shape, variables)
      np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('in_c,depth', [(16, 32), (32, 32)])
def test_ir_se_unit_matches_numpy(in_c, depth):
  unit = iresnet.IRUnit(depth, strides=2, use_se=True)
  x = np.random.default_rng(1).normal(size=(2, 6, 6, in_c)).astype(np.float32)
  abstract = jax.eval_shape(functools.partial(unit.init, train=False), jax.random.key(0), x)
  v = jax.tree.map(np.asarray, numpy_variables(abstract, seed=2))
  out = jax.jit(functools.partial(unit.apply, train=False))(v, x)

  p, s = v['params']['res_layer'], v['batch_stats']['res_layer']
  r = bn_numpy(x, p['bn1'], s['bn1'])
  r = conv_numpy(r, p['conv1']['kernel'], 1, 1)
  r = np.where(r >= 0, r, p['prelu']['negative_slope'] * r)
  r = conv_numpy(r, p['conv2']['kernel'], 2, 1)
  r = bn_numpy(r, p['bn2'], s['bn2'])
  gate = np.maximum(r.mean(axis=(1, 2)) @ p['se']['fc1']['kernel'][0, 0], 0)
  gate = 1 / (1 + np.exp(-(gate @ p['se']['fc2']['kernel'][0, 0])))
  r = r * gate[:, None, None, :]
  if in_c == depth:
    shortcut = x[:, ::2, ::2]  # MaxPool2d(1, stride 2)
  else:
    sp, ss = v['params']['shortcut_layer'], v['batch_stats']['shortcut_layer']
    shortcut = bn_numpy(conv_numpy(x, sp['conv']['kernel'], 2, 0), sp['bn'], ss['bn'])
  assert out.shape == (2, 3, 3, depth)
  np.testing.assert_allclose(out, r + shortcut, rtol=1e-4, atol=1e-4)


def test_dropout_only_in_training():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2, 2, 3)), jnp.float32)

  @functools.partial(jax.jit, static_argnames=('rate', 'train'))
  def apply(variables, key, rate, train):
    head = iresnet.OutputLayer(embedding_size=4, dropout_rate=rate)
    rngs = {'dropout': key} if train else {}
    return head.apply(variables, x, train=train, mutable=['batch_stats'], rngs=rngs)[0]

  variables = numpy_variables(jax.eval_shape(
      functools.partial(iresnet.OutputLayer(4, 0.6).init, train=False), jax.random.key(0), x))
  key1, key2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(apply(variables, key1, 0.6, True),
                                apply(variables, key1, 0.6, True))
  assert not np.allclose(apply(variables, key1, 0.6, True), apply(variables, key2, 0.6, True))
  np.testing.assert_array_equal(apply(variables, key1, 0.0, True),
                                apply(variables, key2, 0.0, True))
  # Eval takes no dropout rng (it would fail if dropout were active) and ignores the rate.
  np.testing.assert_allclose(apply(variables, None, 0.6, False),
                             apply(variables, None, 0.0, False), rtol=1e-6)


# ---------------------------------------------------------------- whole models


@pytest.fixture(scope='module')
def mobilefacenet_setup():
  model = models.create_model('mobilefacenet')
  variables = numpy_variables(abstract_variables(model))
  images = models.normalize_images(
      np.random.default_rng(0).integers(0, 256, size=(4, 112, 112, 3), dtype=np.uint8))
  embeddings = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  return model, variables, images, embeddings


def test_mobilefacenet_eval_gives_unit_embeddings(mobilefacenet_setup):
  _, _, _, embeddings = mobilefacenet_setup
  assert embeddings.shape == (4, 512) and embeddings.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  assert not np.allclose(embeddings[0], embeddings[1])


def test_mobilefacenet_train_updates_every_batch_stat(mobilefacenet_setup):
  model, variables, images, embeddings = mobilefacenet_setup
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  train_embeddings, updates = train_apply(variables, images)
  np.testing.assert_allclose(np.linalg.norm(train_embeddings, axis=1), 1.0, rtol=1e-5)
  assert not np.allclose(train_embeddings, embeddings, atol=1e-3)  # batch statistics used
  old, new = variables['batch_stats'], updates['batch_stats']
  assert jax.tree.structure(old) == jax.tree.structure(new)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), old, new)
  assert all(jax.tree.leaves(changed))


def test_mobilefacenet_bfloat16_returns_float32_unit_vectors(mobilefacenet_setup):
  _, variables, images, embeddings = mobilefacenet_setup
  model = models.create_model('mobilefacenet', dtype=jnp.bfloat16)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  assert out.dtype == jnp.float32 and out.shape == (4, 512)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  cosine = np.sum(np.asarray(out) * np.asarray(embeddings), axis=1)
  assert np.all(cosine > 0.999), cosine  # same function, lower precision (measured ~0.99996)


def test_create_model_rejects_bad_names_options_and_shapes():
  with pytest.raises(ValueError, match='mobilefacenet, ir50, ir100'):
    models.create_model('resnet50')
  with pytest.raises(ValueError, match='dropout_rate'):
    models.create_model('mobilefacenet', dropout_rate=0.1)
  with pytest.raises(ValueError, match='depthwise_impl'):
    models.create_model('mobilefacenet', depthwise_impl='fast')
  with pytest.raises(ValueError, match='kernel_set'):
    models.create_model('mobilefacenet', kernel_set='fast')
  model = models.create_model('ir50', dropout_rate=0.2, embedding_size=128)
  assert isinstance(model, nn.Module) and model.dropout_rate == 0.2
  with pytest.raises(ValueError, match='112'):
    abstract_variables(models.create_model('mobilefacenet'), batch_shape=(1, 96, 96, 3))


def test_normalize_images():
  pixels = np.array([[[[0, 255, 128]]]], np.uint8)
  out = models.normalize_images(pixels)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, 0, 0], [-1.0, 1.0, 128 / 127.5 - 1.0], atol=1e-6)
