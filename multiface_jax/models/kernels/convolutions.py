"""The convolutions of the backbones (NHWC, no bias), in XLA's form and in one written for XLA:CPU.

- :func:`depthwise_conv_lax` / :func:`conv2d_lax`: XLA's own convolutions (every backend).
- :func:`depthwise_conv_shifted`: the depthwise convolution as kh*kw shifted multiply-adds with a
  written-out backward pass. XLA:CPU's grouped convolution is not vectorised over channels and
  runs far below a dense convolution's speed, forward and backward.
- :func:`conv2d_gemm`: 1x1 and 3-channel dense convolutions as matmuls, which XLA:CPU runs faster
  than its convolutions of those shapes; other shapes stay XLA's.

Both forms of each take the same kernel and give the same values and gradients up to float
rounding (tests/test_models.py), so the choice never touches checkpoints. What each buys is
measured in bench/RESULTS.md ("CPU kernels"). Padding is explicit: ((top, bottom), (left, right)).
"""
import functools

import jax
import jax.numpy as jnp

from multiface_jax.models.kernels.chunking import sum_over_image_chunks

Pairs = tuple[tuple[int, int], ...]


def _pad_spatial(x: jax.Array, padding: Pairs) -> jax.Array:
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
                       padding: Pairs) -> jax.Array:
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
                           padding: Pairs) -> jax.Array:
  """Depthwise convolution as kh*kw shifted multiply-adds (arguments as :func:`depthwise_conv_lax`).

  Strides slice each shifted view, so no work is spent on skipped outputs. A kernel that covers
  the whole padded input (MobileFaceNet's global 7x7 depthwise conv) is a weighted sum over H and
  W. The backward pass is written out (``_shifted_taps_bwd``).

  Returns:
    (B, Ho, Wo, C) in the dtype of `x`, accumulated in float32 (a bfloat16 accumulation compiled
    and ran slower on CPU, which computes bfloat16 in float32 anyway).
  """
  kh, kw = kernel.shape[:2]
  out_dtype = x.dtype
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
  """`x` computed into its own buffer: XLA:CPU otherwise fuses a pad into the nine shifted reads
  that consume it, which then run several times slower (a bounds check on every read)."""
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
  # (a negative pad crops) and is height + kh - 1 rows long. One fused pass, like the forward
  # (autodiff's transpose of the strided views is nine separately materialised pads).
  low_h, low_w = kh - 1 - top, kw - 1 - left
  spread = jax.lax.pad(
      grad_out, jnp.array(0, grad_out.dtype),
      ((0, 0, 0), (low_h, height + kh - 1 - low_h - (sh * (out_h - 1) + 1), sh - 1),
       (low_w, width + kw - 1 - low_w - (sw * (out_w - 1) + 1), sw - 1), (0, 0, 0)))
  grad_x = _sum_of_taps(_materialized(spread), weights[::-1, ::-1], (1, 1))
  # The kernel gradient after the input gradient, not interleaved with it: faster on CPU.
  grad_x, x_padded, grad_out = jax.lax.optimization_barrier((grad_x, x_padded, grad_out))
  return grad_x, _depthwise_kernel_grad(x_padded, grad_out, weights.shape[:2], strides)


_shifted_taps.defvjp(_shifted_taps_fwd, _shifted_taps_bwd)

# Images per step of the kernel-gradient loop: 8 keep a slice of a MobileFaceNet map and its
# output gradient in cache; a strided convolution runs fastest one image at a time.
_KERNEL_GRAD_IMAGES = 8
_KERNEL_GRAD_IMAGES_STRIDED = 1


def _depthwise_kernel_grad(x_padded, grad_out, kernel_hw, strides):
  """sum over batch and pixels of (the (i, j) strided view of x_padded) * grad_out, per tap.

  XLA:CPU reduces each tap's product slowly straight from memory. Instead a loop over chunks of
  a few images first adds the chunk's products elementwise (fused with the views), then reduces
  only a one-image-sized partial while the chunk is still in cache. Returns (kh, kw, C) float32.
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

  chunk = (_KERNEL_GRAD_IMAGES if tuple(strides) == (1, 1) else _KERNEL_GRAD_IMAGES_STRIDED)
  total = sum_over_image_chunks(chunk_grad, chunk, x_padded, grad_out)
  return total.reshape(*kernel_hw, grad_out.shape[-1])


def conv2d_lax(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
               padding: Pairs) -> jax.Array:
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


# Inputs with this few channels (the images) are convolved as one matmul over their patches:
# XLA:CPU's convolution of a 3-channel image is slow, and the patch matrix has only kh*kw*Cin
# columns.
_IM2COL_MAX_CHANNELS = 4


def conv2d_gemm(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                padding: Pairs) -> jax.Array:
  """Dense convolution as a matmul where that is faster on CPU, else :func:`conv2d_lax`.

  A 1x1 kernel is a matmul over channels of the strided input; an input of at most
  `_IM2COL_MAX_CHANNELS` channels is a matmul over its patch matrix. Arguments and result as
  :func:`conv2d_lax`'s, equal up to float rounding, with equal gradients.
  """
  if kernel.shape[:2] == (1, 1):
    sh, sw = strides
    x = _pad_spatial(x, padding)[:, ::sh, ::sw, :]
    # A 2-D matmul: its transposes in the backward pass are plain GEMMs (a 4-D einsum's
    # backward ran about 2x slower on XLA:CPU).
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
