"""The convolutions behind :class:`layers.DepthwiseConv2D` and :class:`layers.Conv2D` (NHWC).

Each has XLA's own implementation ('lax') and one written for XLA:CPU ('shifted' depthwise, 'gemm'
dense); ``'auto'`` picks the CPU ones on CPU and XLA's elsewhere. Why (XLA:CPU, measured in
``bench/``): its grouped convolution runs far below the speed of a dense one, forward and
backward, so the depthwise one is written as fused multiply-adds; 1x1 and 3-channel dense ones
run as matmuls. Jit with :func:`compiler_options` so that XLA:CPU keeps the convolutions and
matmuls to itself. All implementations give the same outputs and gradients
(tests/test_models.py) and take the same kernels, so the choice never touches checkpoints.

Padding is explicit, PyTorch-style: 'VALID', an int, or ((top, bottom), (left, right)).
"""
import functools
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp

Padding = Union[str, int, Sequence[tuple[int, int]]]

DEPTHWISE_IMPLS = ('auto', 'lax', 'shifted')
CONV_IMPLS = ('auto', 'lax', 'gemm')


def _resolve(impl: str, kind: str, valid: tuple[str, ...], on_cpu: str) -> str:
  """`impl`, or for 'auto' `on_cpu` on the CPU backend and 'lax' elsewhere; rejects unknowns."""
  if impl not in valid:
    raise ValueError(f'Unknown {kind} {impl!r}; valid: {", ".join(valid)}.')
  if impl == 'auto':
    return on_cpu if jax.default_backend() == 'cpu' else 'lax'
  return impl


def resolve_depthwise_impl(impl: str) -> str:
  """Returns the concrete depthwise implementation for `impl` on the default backend.

  Args:
    impl: one of ``DEPTHWISE_IMPLS``. ``'auto'`` picks ``'shifted'`` on CPU (measured several
      times faster there for 3x3 kernels) and ``'lax'`` elsewhere (not measured on accelerators).

  Returns:
    ``'lax'`` or ``'shifted'``.
  """
  return _resolve(impl, 'depthwise_impl', DEPTHWISE_IMPLS, on_cpu='shifted')


def resolve_conv_impl(impl: str) -> str:
  """Returns the concrete dense-convolution implementation for `impl` on the default backend.

  Args:
    impl: one of ``CONV_IMPLS``. ``'auto'`` picks ``'gemm'`` on CPU, where matmuls beat XLA's
      1x1 and 3-channel convolutions, and ``'lax'`` elsewhere (cuDNN/XLA GPU convolutions are
      fast in every direction).

  Returns:
    ``'lax'`` or ``'gemm'``.
  """
  return _resolve(impl, 'conv_impl', CONV_IMPLS, on_cpu='gemm')


# XLA:CPU's library fusions (jaxlib 0.10.2): by default it hands single dots, single convolutions
# and reductions to YNNPACK (XNNPACK's successor). Its convolutions ran slower than XLA's own
# (Eigen) on every convolution of IR-SE50 measured here (batch 16, forward / forward + both
# gradients in ms: (112, 112, 64) 3x3 191 -> 153 / 3,476 -> 548; (28, 28, 128) 216 -> 97 for the
# gradients; (7, 7, 512) 55 -> 35 / 176 -> 97), and its dots 0-15% slower than Eigen's on
# MobileFaceNet's 1x1 convolutions (e.g. (25088, 64) x (64, 128): 4.1 vs 3.5 ms; whole networks,
# images/s, YNNPACK's dots vs Eigen's: MobileFaceNet training 25.4 vs 28.2, embedding 195 vs 212;
# IR-SE50 2.20 vs 2.28, 8.5 vs 8.7), while its reductions are the fast ones (off: MobileFaceNet
# training 29 -> 18 images/s). So this project compiles on CPU with YNNPACK's reductions only.
# (A convolution whose only consumer is a reduction can still reach YNNPACK inside the
# reduction's fusion; measured: none does in IR-SE50's train step and embedding, nor in
# MobileFaceNet's embedding.)
_CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE',
}


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """XLA compile options for jitting these models: ``jax.jit(fn, compiler_options=...)``.

  On CPU, convolutions and dots stay XLA's own instead of YNNPACK's (see
  ``_CPU_COMPILER_OPTIONS``): IR-SE50 trains 1.7 -> 2.3 images/s with them (batch 16, 2 cores;
  bench/RESULTS.md). The project's jitted functions (``train.Trainer``, ``evaluation.embed``)
  pass them; a function jitted without them computes the same values, only slower on CPU.
  Empty on other backends.

  Args:
    backend: 'cpu', 'gpu', 'tpu', ...; default ``jax.default_backend()``.
  """
  if (backend or jax.default_backend()) == 'cpu':
    return dict(_CPU_COMPILER_OPTIONS)
  return {}


def explicit_padding(padding: Padding, ndim: int = 2) -> tuple[tuple[int, int], ...]:
  """Turns 'VALID', an int or per-dimension (lo, hi) pairs into explicit pairs."""
  if isinstance(padding, str):
    if padding.upper() != 'VALID':
      raise ValueError(f"Only 'VALID' or explicit padding is supported, got {padding!r}: "
                       "'SAME' differs from PyTorch for strided convolutions.")
    return ((0, 0),) * ndim
  if isinstance(padding, int):
    return ((padding, padding),) * ndim
  pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pairs) != ndim:
    raise ValueError(f'Expected {ndim} (lo, hi) padding pairs, got {padding!r}.')
  return pairs


def _pad_spatial(x: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
  if any(lo or hi for lo, hi in padding):
    return jnp.pad(x, ((0, 0), *padding, (0, 0)))
  return x


def _windows(x_padded: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
             out_hw: tuple[int, int]) -> list[jax.Array]:
  """The kh*kw strided (B, Ho, Wo, C) views of a padded input, one per kernel tap (row-major)."""
  (kh, kw), (sh, sw), (oh, ow) = kernel_hw, strides, out_hw
  return [x_padded[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]


def depthwise_conv_lax(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                       padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Depthwise convolution through XLA's grouped convolution.

  Args:
    x: (B, H, W, C) input.
    kernel: (kh, kw, 1, C) kernel, same dtype as `x`.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    (B, Ho, Wo, C).
  """
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                           padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Depthwise convolution as kh*kw shifted multiply-adds (fast on CPU, where XLA's grouped
  convolution is not vectorised over channels).

  Strides are applied by slicing each shifted view, so no work is spent on skipped outputs. When
  the kernel covers the whole padded input (the global 7x7 depthwise conv of MobileFaceNet), the
  convolution is a plain weighted sum over H and W. The backward pass is written out (see
  ``_shifted_taps_bwd``): the input gradient is the same kind of shifted sum, the kernel gradient
  a loop over chunks of images that stay in cache.

  Args:
    x: (B, H, W, C) input.
    kernel: (kh, kw, 1, C) kernel.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    (B, Ho, Wo, C) in the dtype of `x` (accumulated in float32), equal to
    :func:`depthwise_conv_lax` up to float rounding.
  """
  kh, kw = kernel.shape[:2]
  out_dtype = x.dtype
  # Accumulate in float32: CPUs compute bfloat16 arithmetic in float32 anyway, and a bfloat16
  # MobileFaceNet compiled 2.5x slower and ran slower when the taps stayed in bfloat16 (XLA CPU).
  x = x.astype(jnp.float32)
  weights = kernel[:, :, 0, :].astype(jnp.float32)  # (kh, kw, C)
  height, width = (x.shape[1] + sum(padding[0]), x.shape[2] + sum(padding[1]))
  if (height - kh) // strides[0] < 0 or (width - kw) // strides[1] < 0:
    raise ValueError(f'Kernel {kh}x{kw} is larger than the padded input {height}x{width}.')
  if (height, width) == (kh, kw):
    x = _pad_spatial(x, padding)
    return jnp.sum(x * weights, axis=(1, 2), keepdims=True).astype(out_dtype)
  return _shifted_taps(x, weights, tuple(strides), tuple(padding)).astype(out_dtype)


def _shifted_out_hw(x_padded, weights, strides):
  (height, width), (kh, kw), (sh, sw) = x_padded.shape[1:3], weights.shape[:2], strides
  return (height - kh) // sh + 1, (width - kw) // sw + 1


def _sum_of_taps(x_padded, weights, strides):
  """sum over taps (i, j) of weights[i, j] * the (i, j) strided view of the padded input."""
  views = _windows(x_padded, weights.shape[:2], strides,
                   _shifted_out_hw(x_padded, weights, strides))
  flat_weights = weights.reshape(-1, weights.shape[-1])
  out = views[0] * flat_weights[0]
  for view, weight in zip(views[1:], flat_weights[1:]):
    out = out + view * weight
  return out


def _materialized(x):
  """`x` computed into its own buffer. XLA:CPU otherwise fuses a pad into the nine shifted reads
  that consume it, which then run 3x slower (bounds checks on every read)."""
  return jax.lax.optimization_barrier(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_taps(x, weights, strides, padding):
  return _sum_of_taps(_materialized(_pad_spatial(x, padding)), weights, strides)


def _shifted_taps_fwd(x, weights, strides, padding):
  x_padded = _materialized(_pad_spatial(x, padding))
  return _sum_of_taps(x_padded, weights, strides), (x_padded, weights)


def _shifted_taps_bwd(strides, padding, residuals, grad_out):
  x_padded, weights = residuals
  (kh, kw), (sh, sw) = weights.shape[:2], strides
  (out_h, out_w) = grad_out.shape[1:3]
  (top, bottom), (left, right) = padding
  height = x_padded.shape[1] - top - bottom  # the unpadded input
  width = x_padded.shape[2] - left - right
  # The input gradient is a stride-1 correlation of the flipped kernel with the output gradient
  # spread back onto the padded input grid (zeros between the rows/columns of a strided conv),
  # evaluated on the unpadded input only: the spread starts kh-1 rows before the first input row
  # (a negative pad crops) and is height + kh - 1 rows long. The same fused single pass as the
  # forward. (Autodiff's transpose of the strided views is 9 separately materialised pads.)
  low_h, low_w = kh - 1 - top, kw - 1 - left
  spread = jax.lax.pad(
      grad_out, jnp.array(0, grad_out.dtype),
      ((0, 0, 0), (low_h, height + kh - 1 - low_h - (sh * (out_h - 1) + 1), sh - 1),
       (low_w, width + kw - 1 - low_w - (sw * (out_w - 1) + 1), sw - 1), (0, 0, 0)))
  grad_x = _sum_of_taps(_materialized(spread), weights[::-1, ::-1], (1, 1))
  # Scheduling the kernel gradient after the input gradient measured 0-15% faster on a whole
  # MobileFaceNet backward pass than letting XLA interleave their fusions.
  grad_x, x_padded, grad_out = jax.lax.optimization_barrier((grad_x, x_padded, grad_out))
  return grad_x, _depthwise_kernel_grad(x_padded, grad_out, weights.shape[:2], strides)


# Images per step of the kernel-gradient loop, by stride: 8 keeps a (8, 30, 30, 128) float32 slice
# of a MobileFaceNet map (3.7 MB) and its output gradient in cache; 4 and 16 measured slower. A
# strided convolution's loop runs fastest one image at a time (batch 64, ms for chunks of 1/2/8
# images: (56, 56, 128) stride 2 37/74/60, (28, 28, 256) stride 2 18/31/25), where stride 1
# measured 1.5-3x slower at 1 than at 8.
_DEPTHWISE_KERNEL_GRAD_CHUNK = 8
_DEPTHWISE_KERNEL_GRAD_CHUNK_STRIDED = 1


def _depthwise_kernel_grad(x_padded, grad_out, kernel_hw, strides):
  """sum over batch and pixels of (the (i, j) strided view of x_padded) * grad_out, per tap.

  Each tap's product is a strided view times grad_out, which XLA:CPU reduces slowly straight
  from memory. Instead a loop over chunks of a few images (`_DEPTHWISE_KERNEL_GRAD_CHUNK*`)
  first adds the chunk's products elementwise (fused with the views) and then reduces only a
  one-image-sized partial, while the chunk is still in cache: 2-3x faster than the same over the
  whole batch at once (measured on MobileFaceNet's maps, batch 64). Returns (kh, kw, C) float32.
  """
  out_hw = grad_out.shape[1:3]

  def chunk_grad(x_chunk, grad_chunk):
    partials = []
    for view in _windows(x_chunk, kernel_hw, strides, out_hw):
      products = view * grad_chunk
      partial = products[0]
      for k in range(1, products.shape[0]):
        partial = partial + products[k]
      partials.append(partial)
    return jnp.sum(jnp.stack(partials), axis=(1, 2))  # (taps, C)

  chunk = (_DEPTHWISE_KERNEL_GRAD_CHUNK if tuple(strides) == (1, 1) else
           _DEPTHWISE_KERNEL_GRAD_CHUNK_STRIDED)
  total = sum_over_image_chunks(chunk_grad, chunk, x_padded, grad_out)
  return total.reshape(*kernel_hw, grad_out.shape[-1])


def sum_over_image_chunks(fn, chunk, *arrays):
  """sum of fn(*slices) over consecutive slices of `chunk` images of `arrays` (a batch axis 0).

  For reductions that XLA:CPU runs from memory once per reduced quantity: each chunk is read
  from memory once, and the several reductions over it (or the copies before a matmul) then run
  in cache. A loop over chunk indices that slices the whole arrays, not a scan over a
  chunk-shaped reshape of them: XLA then recomputes an input (e.g. a padded one) in that shape,
  a second copy. The last, shorter chunk of a batch that `chunk` does not divide is added
  outside the loop.
  """
  batch = arrays[0].shape[0]
  chunk = min(chunk, batch)
  steps, rest = divmod(batch, chunk)
  if steps == 1 and not rest:
    return fn(*arrays)

  def body(step, total):
    start = step * chunk
    return total + fn(*(jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in arrays))

  result = jax.eval_shape(fn, *(a[:chunk] for a in arrays))
  total = jax.lax.fori_loop(0, steps, body, jnp.zeros(result.shape, result.dtype))
  if rest:
    total = total + fn(*(a[steps * chunk:] for a in arrays))
  return total


# Bytes of one input per chunk of `sum_over_image_chunks` for the BatchNorm + PReLU backward
# (layers.affine_prelu). Measured against the whole batch at once: 112 -> 56 ms on a
# (64, 56, 56, 128) map, 48 -> 32 on (64, 28, 28, 256), 39 -> 18 on (64, 14, 14, 512). Chunks
# of 4 MiB and more lost most of the gain.
CHUNK_BYTES = 1 << 20


def images_per_chunk(x: jax.Array) -> int:
  """How many images (slices along axis 0) of `x` fit `CHUNK_BYTES`, at least 1, on the CPU
  backend; elsewhere the whole batch (a GPU reduces a whole map in one pass, and a loop of small
  kernels would only add launches)."""
  if jax.default_backend() != 'cpu':
    return x.shape[0]
  return max(1, CHUNK_BYTES // (math.prod(x.shape[1:]) * x.dtype.itemsize))


_shifted_taps.defvjp(_shifted_taps_fwd, _shifted_taps_bwd)


def conv2d_lax(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
               padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Dense convolution through XLA (``lax.conv_general_dilated``), NHWC / HWIO.

  Args:
    x: (B, H, W, Cin) input.
    kernel: (kh, kw, Cin, Cout), same dtype as `x`.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    (B, Ho, Wo, Cout).
  """
  return jax.lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv2d_gemm(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Dense convolution as a matmul where that is faster on CPU, else XLA's.

  A 1x1 kernel is a matmul over channels (of the strided input), forward and backward. So is a
  convolution of an input with at most `_IM2COL_MAX_CHANNELS` channels (the images of the first
  layer), over the patch matrix. Other kernels are :func:`conv2d_lax`: with
  :func:`compiler_options`, XLA:CPU's own convolutions ran 1.0-1.45x faster in forward +
  backward than a kernel gradient as one matmul per tap (IR-SE50's 3x3 layers, batch 16), the
  form this function had before; without those options the kernel gradient ran up to 6x slower.

  Arguments and result as :func:`conv2d_lax`'s, equal up to float rounding, with equal gradients.
  """
  if kernel.shape[:2] == (1, 1):
    sh, sw = strides
    x = _pad_spatial(x, padding)[:, ::sh, ::sw, :]
    # A 2-D matmul: its transposes in the backward pass are plain GEMMs (a 4-D einsum's
    # backward measured 2x slower on XLA:CPU).
    out = x.reshape(-1, x.shape[-1]) @ kernel[0, 0]
    return out.reshape(*x.shape[:-1], kernel.shape[-1])
  if x.shape[-1] <= _IM2COL_MAX_CHANNELS:
    kh, kw, cin, cout = kernel.shape
    x_padded = _pad_spatial(x, padding)
    out_hw = ((x_padded.shape[1] - kh) // strides[0] + 1, (x_padded.shape[2] - kw) // strides[1] + 1)
    # (B, Ho, Wo, kh*kw*Cin), tap-major like the HWIO kernel's first three axes.
    patches = jnp.concatenate(_windows(x_padded, (kh, kw), strides, out_hw), axis=-1)
    out = patches.reshape(-1, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)
    return out.reshape(x.shape[0], *out_hw, cout)
  return conv2d_lax(x, kernel, strides, padding)


# Inputs with this few channels are convolved as one matmul over their patches: XLA:CPU's
# convolution of the 3-channel 112x112 images ran at 3-10 GFLOP/s, and the patch matrix is small
# (kh*kw*Cin = 27 columns). Measured on the first layer, batch 64: weight gradient 121 -> 87 ms.
_IM2COL_MAX_CHANNELS = 4


CONV_FNS = {'lax': conv2d_lax, 'gemm': conv2d_gemm}
DEPTHWISE_FNS = {'lax': depthwise_conv_lax, 'shifted': depthwise_conv_shifted}
