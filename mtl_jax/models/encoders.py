"""Shared encoders (MLP, small CNN, MTAN SegNet, ResNet-18) built only from `layers` modules.

Every parameterised layer is a `layers.Dense`, `layers.Conv` or `layers.Norm`, so the Gramian
engine can capture the input and output of each of them. Pooling, upsampling and activations
have no parameters and are plain JAX functions.

All encoders take NHWC float32 images `[B, H, W, 3]` and `__call__(x, train)`. Global encoders
return `[B, D]`; dense encoders return per-pixel features `[B, H, W, C]` at input resolution.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models import layers

# The MTAN SegNet (VGG-16 layout) has five 2x2 max-pool stages, so sizes must divide 2**5.
SEGNET_DOWNSAMPLING = 32


def scaled_width(width: int, width_multiplier: float, minimum: int = 4) -> int:
  """A channel count scaled by width_multiplier, rounded, and at least `minimum`."""
  return max(minimum, int(round(width * width_multiplier)))


def global_average_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C]."""
  return jnp.mean(x, axis=(1, 2))


def max_pool_with_mask(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2x2 stride-2 max-pooling that also returns where each window's maximum was.

  This is SegNet's "max-pool with indices" in mask form: the mask has the shape of `x` and holds
  exactly one 1 per 2x2 window, at the maximum. Ties go to the first position in row-major order
  within the window (top-left first), as in PyTorch. The pooled value is read through the mask
  rather than with `jnp.max`, so its gradient flows only to that one position, even on ties.

  Args:
    x: `[B, H, W, C]` with H and W even.

  Returns:
    pooled: `[B, H/2, W/2, C]`.
    mask: `[B, H, W, C]`, same dtype as x, one-hot within each window.
  """
  batch, height, width, channels = x.shape
  if height % 2 or width % 2:
    raise ValueError(f"max_pool_with_mask needs even height and width; got {height}x{width}.")
  windows = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  # [B, H/2, W/2, C, 4] with window positions in row-major order: (0,0), (0,1), (1,0), (1,1).
  windows = windows.transpose(0, 1, 3, 5, 2, 4).reshape(batch, height // 2, width // 2, channels, 4)
  # jnp.argmax returns the first maximum, which is the tie-break we want.
  window_mask = jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=x.dtype)
  window_mask = jax.lax.stop_gradient(window_mask)
  pooled = jnp.sum(windows * window_mask, axis=-1)
  mask = window_mask.reshape(batch, height // 2, width // 2, channels, 2, 2)
  mask = mask.transpose(0, 1, 4, 2, 5, 3).reshape(batch, height, width, channels)
  return pooled, mask


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max-pooling with SAME padding, [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C].

  For even H and W this is `max_pool_with_mask`'s pooled output: the same values and the same
  gradient (ties go to the first position, as XLA's select-and-scatter does), but its backward
  is a mask multiply, which measured 16x faster on XLA:CPU than `nn.max_pool`'s
  select-and-scatter (B=128, 32x32x16). That matters most to the Gramian engine, which runs T
  backward passes. Odd sizes fall back to `nn.max_pool`.
  """
  if x.shape[1] % 2 or x.shape[2] % 2:
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
  return max_pool_with_mask(x)[0]


def max_unpool(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Inverse of `max_pool_with_mask`: puts each value back where its window's maximum was.

  Args:
    x: `[B, h, w, C]` values to place.
    mask: `[B, 2h, 2w, C]` mask returned by `max_pool_with_mask`.

  Returns:
    `[B, 2h, 2w, C]`: x at the masked positions, zeros elsewhere.
  """
  expected = (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3])
  if tuple(mask.shape) != expected:
    raise ValueError(f"max_unpool mask shape {tuple(mask.shape)} does not match {expected}.")
  upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return upsampled * mask


class ConvNormReLU(nn.Module):
  """Conv -> Norm -> ReLU, the building block of the convolutional encoders."""

  features: int
  norm: str = "batch"
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  use_bias: bool = True
  kernel_init: layers.Initializer = nn.initializers.he_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.Conv(
      self.features,
      kernel_size=self.kernel_size,
      strides=self.strides,
      use_bias=self.use_bias,
      kernel_init=self.kernel_init,
      name="conv",
    )(x)
    x = layers.Norm(self.norm, name="norm")(x, train)
    return nn.relu(x)


class MLPEncoder(nn.Module):
  """Flattens the image and applies Dense -> Norm -> ReLU per hidden size; returns `[B, D]`."""

  hidden: Sequence[int] = (256, 256)
  norm: str = "batch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers.check_norm(self.norm)
    x = x.reshape(x.shape[0], -1)
    for index, features in enumerate(self.hidden):
      x = layers.Dense(features, kernel_init=nn.initializers.he_normal(), name=f"dense_{index}")(x)
      x = layers.Norm(self.norm, name=f"norm_{index}")(x, train)
      x = nn.relu(x)
    return x


class SmallCNN(nn.Module):
  """A few conv3x3-norm-ReLU blocks: a CPU-fast encoder for small images.

  With `dense_output` every block runs at full input resolution and the output is
  `[B, H, W, C]`; otherwise a 2x2 max-pool follows every block but the last, and the output is
  global-average-pooled to `[B, C]`.
  """

  features: Sequence[int] = (16, 32, 32)
  norm: str = "batch"
  dense_output: bool = False
  stage_outputs: bool = False  # True: return every block's output (MTAN's attention taps).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array | tuple[jax.Array, ...]:
    layers.check_norm(self.norm)
    stages = []
    for index, features in enumerate(self.features):
      x = ConvNormReLU(features, norm=self.norm, name=f"block_{index}")(x, train)
      stages.append(x)
      if not self.dense_output and index < len(self.features) - 1:
        x = max_pool_2x2(x)
    if self.stage_outputs:
      return tuple(stages)
    if self.dense_output:
      return x
    return global_average_pool(x)


class SegNet(nn.Module):
  """The MTAN "split" SegNet: a VGG-16-like encoder-decoder with max-unpooling; `[B, H, W, C]`.

  Layout (as in MTAN's `model_segnet_split.py`), with filters f = [64, 128, 256, 512, 512] times
  `width_multiplier` (rounded, at least 4) and every conv a 3x3 conv -> norm -> ReLU:

  - encoder stage l = 0..4: conv to f[l], then 1 more conv (l = 0, 1) or 2 more (l >= 2), i.e.
    2, 2, 3, 3, 3 convs (VGG-16); then 2x2 max-pool, keeping the argmax mask.
  - decoder stage l = 4..0: max-unpool with stage l's mask, conv f[l] -> f[l-1] (f[0] -> f[0]
    for l = 0), then 2 more convs at f[l-1] (l >= 2) or 1 more (l <= 1): 3, 3, 3, 2, 2 convs.

  The output has f[0] = 64 * width_multiplier channels at the input resolution. Kernels are
  Xavier-normal and convs keep their bias, as in MTAN. H and W must be divisible by 32.
  With `stage_outputs` it returns the ten stages' outputs instead (each encoder stage's before
  its max-pool, then each decoder stage's; the last is the usual output).
  """

  width_multiplier: float = 1.0
  norm: str = "batch"
  stage_outputs: bool = False

  @property
  def filters(self) -> tuple[int, ...]:
    return tuple(scaled_width(width, self.width_multiplier) for width in (64, 128, 256, 512, 512))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array | tuple[jax.Array, ...]:
    layers.check_norm(self.norm)
    check_segnet_input_size(x.shape[1], x.shape[2])
    filters = self.filters
    kernel_init = nn.initializers.xavier_normal()

    def block(features: int, name: str) -> ConvNormReLU:
      return ConvNormReLU(features, norm=self.norm, kernel_init=kernel_init, name=name)

    masks, stages = [], []
    for level, features in enumerate(filters):
      extra_convs = 1 if level < 2 else 2
      for index in range(1 + extra_convs):
        x = block(features, f"encoder_{level}_{index}")(x, train)
      stages.append(x)
      x, mask = max_pool_with_mask(x)
      masks.append(mask)

    for level in reversed(range(len(filters))):
      x = max_unpool(x, masks[level])
      features = filters[max(level - 1, 0)]
      extra_convs = 1 if level < 2 else 2
      for index in range(1 + extra_convs):
        x = block(features, f"decoder_{level}_{index}")(x, train)
      stages.append(x)
    return tuple(stages) if self.stage_outputs else x


def check_segnet_input_size(height: int, width: int) -> None:
  """Raises a ValueError with valid nearby sizes unless height and width divide by 32."""
  step = SEGNET_DOWNSAMPLING
  if height % step == 0 and width % step == 0:
    return

  def nearby(size: int) -> str:
    lower = (size // step) * step
    options = [value for value in (lower, lower + step) if value > 0]
    return " or ".join(str(value) for value in options)

  raise ValueError(
    f"SegNet needs input height and width divisible by {step} (five 2x2 max-pool stages); "
    f"got {height}x{width}. Valid sizes are multiples of {step}: height {nearby(height)}, "
    f"width {nearby(width)} (e.g. resize or crop to {nearby(height).split()[-1]}x"
    f"{nearby(width).split()[-1]})."
  )


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 convs with a residual (projected when the shape changes)."""

  features: int
  strides: int = 1
  norm: str = "batch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kernel_init = nn.initializers.he_normal()
    # A bias before a normalisation is redundant; without normalisation it is needed.
    use_bias = self.norm == "none"
    residual = x
    y = ConvNormReLU(
      self.features,
      norm=self.norm,
      strides=(self.strides, self.strides),
      use_bias=use_bias,
      kernel_init=kernel_init,
      name="conv_norm_relu",
    )(x, train)
    y = layers.Conv(self.features, use_bias=use_bias, kernel_init=kernel_init, name="conv")(y)
    y = layers.Norm(self.norm, name="norm")(y, train)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = layers.Conv(
        self.features,
        kernel_size=(1, 1),
        strides=(self.strides, self.strides),
        use_bias=use_bias,
        kernel_init=kernel_init,
        name="shortcut_conv",
      )(x)
      residual = layers.Norm(self.norm, name="shortcut_norm")(residual, train)
    return nn.relu(y + residual)


RESNET_STEMS = ("imagenet", "cifar")


class ResNet18(nn.Module):
  """ResNet-18 (BasicBlocks [2, 2, 2, 2]) returning global-average-pooled features `[B, D]`.

  Widths are [64, 128, 256, 512] times `width_multiplier` (rounded, at least 4); He-normal
  kernels. The 'imagenet' stem is conv7x7/2 + norm + ReLU + maxpool3x3/2; the 'cifar' stem is a
  conv3x3/1 + norm + ReLU without max-pool, for 32x32 or 64x64 images. With `stage_outputs`
  it returns the outputs of the stem (after its max-pool) and of the four stages, unpooled.
  """

  width_multiplier: float = 1.0
  norm: str = "batch"
  stem: str = "imagenet"
  stage_outputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array | tuple[jax.Array, ...]:
    layers.check_norm(self.norm)
    if self.stem not in RESNET_STEMS:
      raise ValueError(
        f"Unknown ResNet stem {self.stem!r}; valid stems: {', '.join(RESNET_STEMS)}."
      )
    widths = [scaled_width(width, self.width_multiplier) for width in (64, 128, 256, 512)]
    use_bias = self.norm == "none"
    kernel_init = nn.initializers.he_normal()
    if self.stem == "imagenet":
      x = ConvNormReLU(
        widths[0],
        norm=self.norm,
        kernel_size=(7, 7),
        strides=(2, 2),
        use_bias=use_bias,
        kernel_init=kernel_init,
        name="stem",
      )(x, train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    else:
      x = ConvNormReLU(
        widths[0], norm=self.norm, use_bias=use_bias, kernel_init=kernel_init, name="stem"
      )(x, train)
    stages = [x]
    for stage, features in enumerate(widths):
      for index in range(2):
        strides = 2 if stage > 0 and index == 0 else 1
        block = BasicBlock(
          features, strides=strides, norm=self.norm, name=f"stage_{stage}_block_{index}"
        )
        x = block(x, train)
      stages.append(x)
    return tuple(stages) if self.stage_outputs else global_average_pool(x)
