"""DeepLabV3: a dilated ResNet-50 encoder (output stride 8) and one ASPP head per task, from
`layers` only.

The layout follows torchvision's `deeplabv3_resnet50` (which LibMTL's DeepLabV3 also uses):
ResNet-50 v1.5 (Bottleneck blocks [3, 4, 6, 3], the stride in the 3x3 conv) whose last two
stages keep their resolution and dilate instead (rates 2 and 4; the first block of each
dilated stage still uses the previous rate), so the features are [B, H/8, W/8, 2048]. Each
task's head is ASPP (a 1x1 branch, three 3x3 branches dilated 12 / 24 / 36, an image-pooling
branch; each 256 channels with norm + ReLU; concatenated and projected by a 1x1 conv to 256),
then conv3x3 (256) + norm + ReLU and a 1x1 conv to the task's channels, and bilinear
upsampling back to the input size. torchvision's dropout (0.5 after the projection) is left
out: the train step has no dropout RNG.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax import tasks as tasks_lib
from mtl_jax.models import layers
from mtl_jax.models.encoders import scaled_width

OUTPUT_STRIDE = 8
ASPP_RATES = (12, 24, 36)
RESNET50_BLOCKS = (3, 4, 6, 3)
# Output stride 8: stages 3 and 4 replace their stride 2 by dilation.
_DILATE_STAGE = (False, False, True, True)


def conv_norm(
  x: jax.Array,
  features: int,
  kernel: int,
  train: bool,
  norm: str,
  name: str,
  strides: int = 1,
  dilation: int = 1,
  relu: bool = True,
) -> jax.Array:
  """Conv (no bias unless there is no norm) -> Norm -> optional ReLU, as named submodules of the
  caller."""
  x = layers.Conv(
    features,
    kernel_size=(kernel, kernel),
    strides=(strides, strides),
    dilation=(dilation, dilation),
    use_bias=norm == "none",
    kernel_init=nn.initializers.he_normal(),
    name=f"{name}_conv",
  )(x)
  x = layers.Norm(norm, name=f"{name}_norm")(x, train)
  return nn.relu(x) if relu else x


class Bottleneck(nn.Module):
  """ResNet bottleneck: 1x1 (width) -> 3x3 (width, stride, dilation) -> 1x1 (4 x width),
  residual."""

  width: int
  strides: int = 1
  dilation: int = 1
  norm: str = "batch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_features = 4 * self.width
    y = conv_norm(x, self.width, 1, train, self.norm, "reduce")
    y = conv_norm(
      y, self.width, 3, train, self.norm, "spatial", strides=self.strides, dilation=self.dilation
    )
    y = conv_norm(y, out_features, 1, train, self.norm, "expand", relu=False)
    residual = x
    if self.strides != 1 or x.shape[-1] != out_features:
      residual = conv_norm(
        x, out_features, 1, train, self.norm, "shortcut", strides=self.strides, relu=False
      )
    return nn.relu(y + residual)


class DilatedResNet50(nn.Module):
  """ResNet-50 at output stride 8: `[B, H, W, 3]` -> `[B, H/8, W/8, 2048 x width_multiplier]`.

  H and W must be divisible by 8. Widths are [64, 128, 256, 512] (x4 after each bottleneck)
  times `width_multiplier`, rounded, at least 4.
  """

  width_multiplier: float = 1.0
  norm: str = "batch"
  blocks: Sequence[int] = RESNET50_BLOCKS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers.check_norm(self.norm)
    height, width = x.shape[1:3]
    if height % OUTPUT_STRIDE or width % OUTPUT_STRIDE:
      raise ValueError(
        f"DeepLabV3 needs input height and width divisible by {OUTPUT_STRIDE}; got "
        f"{height}x{width}."
      )
    widths = [scaled_width(value, self.width_multiplier) for value in (64, 128, 256, 512)]
    x = conv_norm(x, widths[0], 7, train, self.norm, "stem", strides=2)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    dilation = 1
    for stage, (stage_width, count) in enumerate(zip(widths, self.blocks)):
      previous_dilation = dilation
      strides = 1 if stage == 0 else 2
      if _DILATE_STAGE[stage]:
        dilation, strides = dilation * strides, 1
      for index in range(count):
        block = Bottleneck(
          stage_width,
          strides=strides if index == 0 else 1,
          dilation=previous_dilation if index == 0 else dilation,
          norm=self.norm,
          name=f"stage_{stage}_block_{index}",
        )
        x = block(x, train)
    return x


class ASPPHead(nn.Module):
  """A task's DeepLabV3 head: ASPP, conv3x3 + norm + ReLU, conv1x1 to `out_channels`, bilinear
  upsampling.

  Input: encoder features `[B, h, w, C]`; output float32 `[B, h x upsample, w x upsample, out]`.
  """

  out_channels: int
  channels: int = 256
  rates: Sequence[int] = ASPP_RATES
  upsample: int = OUTPUT_STRIDE
  norm: str = "batch"

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    if features.ndim != 4:
      raise ValueError(
        f"ASPPHead needs per-pixel features [B, H, W, C]; got shape {tuple(features.shape)}."
      )
    batch, height, width, _ = features.shape
    branches = [conv_norm(features, self.channels, 1, train, self.norm, "aspp_1x1")]
    for rate in self.rates:
      branches.append(
        conv_norm(features, self.channels, 3, train, self.norm, f"aspp_rate_{rate}", dilation=rate)
      )
    pooled = jnp.mean(features, axis=(1, 2), keepdims=True)
    pooled = conv_norm(pooled, self.channels, 1, train, self.norm, "aspp_pool")
    # Upsampling a 1x1 map bilinearly is a broadcast.
    branches.append(jnp.broadcast_to(pooled, (batch, height, width, self.channels)))
    x = conv_norm(
      jnp.concatenate(branches, axis=-1), self.channels, 1, train, self.norm, "aspp_project"
    )
    x = conv_norm(x, self.channels, 3, train, self.norm, "head")
    x = layers.Conv(
      self.out_channels,
      kernel_size=(1, 1),
      kernel_init=nn.initializers.he_normal(),
      name="conv_output",
    )(x)
    x = jax.image.resize(
      x, (batch, height * self.upsample, width * self.upsample, self.out_channels), "bilinear"
    )
    return tasks_lib.at_least_float32(x)
