"""Parameterised layers that every encoder is built from, so the Gramian engine can see inside them.

Every layer with shared (encoder) parameters is one of `Dense`, `Conv` or `Affine` (the
learned scale and shift of a normalisation layer, kept separate from the normalisation itself).
Each of them is a plain Flax linen module whose parameters have the usual names (`kernel`,
`bias`, `scale`), so an optimizer or a checkpoint sees nothing unusual; what they add is that
their input and output can be captured, which is what a per-sample Gramian needs.

Mixed precision: parameters are always float32; each layer computes in the dtype of its input
(its parameters are cast to it), so a model whose input is cast to bfloat16 runs its matmuls,
convolutions, activations and normalisations in bfloat16 (statistics summed in float32; running
averages stored in float32), and gradients reach the float32 parameters in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

NORM_KINDS = ("batch", "group", "layer", "none")
# Activation and matmul dtypes of a model (config.model.dtype); parameters stay float32.
DTYPES = ("float32", "bfloat16")


class Dense(nn.Module):
  """y = x W + b over the last axis."""

  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features))
    outputs = jnp.dot(inputs, kernel.astype(inputs.dtype))
    if self.use_bias:
      outputs = outputs + self.param("bias", self.bias_init, (self.features,)).astype(inputs.dtype)
    return outputs


class Conv(nn.Module):
  """2-D convolution over NHWC inputs with SAME padding, strides and dilation."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  dilation: Sequence[int] = (1, 1)
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_shape = (*self.kernel_size, inputs.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape)
    outputs = jax.lax.conv_general_dilated(
      inputs,
      kernel.astype(inputs.dtype),
      window_strides=tuple(self.strides),
      padding="SAME",
      rhs_dilation=tuple(self.dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.use_bias:
      outputs = outputs + self.param("bias", self.bias_init, (self.features,)).astype(inputs.dtype)
    return outputs


class Affine(nn.Module):
  """Per-channel y = x * scale + bias: the learned part of a normalisation layer."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    channels = inputs.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    return inputs * scale.astype(inputs.dtype) + bias.astype(inputs.dtype)


# Fewest values a group-norm group should normalise over: a group of one value (a [B, D]
# input with D <= 32 channels and one channel per group) would always normalise to zero.
_MIN_GROUP_ELEMENTS = 8


def _group_count(channels: int, preferred: int = 32, positions: int = 1) -> int:
  """The largest group count <= preferred that divides the channel count.

  Groups are also kept big enough that each normalises over at least _MIN_GROUP_ELEMENTS values
  (channels per group times `positions`, the number of spatial positions) where possible.
  """
  minimum_channels = -(-_MIN_GROUP_ELEMENTS // max(positions, 1))
  for groups in range(min(preferred, channels), 0, -1):
    if channels % groups == 0 and (channels // groups >= minimum_channels or groups == 1):
      return groups
  return 1


class Norm(nn.Module):
  """Normalisation chosen by name: 'batch', 'group', 'layer' or 'none'.

  The statistics are computed without learned parameters and followed by `Affine`, so the
  learned scale and shift are ordinary shared parameters like any kernel. 'batch' uses the
  batch's statistics in training and running averages in evaluation (collection
  'batch_stats'); it couples the samples of a batch, which matters for per-sample gradients.
  """

  kind: str = "batch"
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
    if self.kind not in NORM_KINDS:
      raise ValueError(f"Unknown norm {self.kind!r}; valid norms: {', '.join(NORM_KINDS)}.")
    if self.kind == "none":
      return inputs
    # Reduced-precision activations: the statistics are still summed in float32 (jnp.mean
    # accumulates bfloat16 in float32) but the normalisation's arithmetic stays in bfloat16, so
    # no float32 copy of the activation is kept for the backward pass.
    float32_arithmetic = inputs.dtype == jnp.float32
    if self.kind == "batch":
      normalised = nn.BatchNorm(
        use_running_average=not train,
        momentum=self.momentum,
        epsilon=self.epsilon,
        use_scale=False,
        use_bias=False,
        force_float32_reductions=float32_arithmetic,
      )(inputs)
    elif self.kind == "group":
      normalised = nn.GroupNorm(
        num_groups=_group_count(inputs.shape[-1], positions=math.prod(inputs.shape[1:-1])),
        epsilon=self.epsilon,
        use_scale=False,
        use_bias=False,
        force_float32_reductions=float32_arithmetic,
      )(inputs)
    else:
      normalised = nn.LayerNorm(
        epsilon=self.epsilon,
        use_scale=False,
        use_bias=False,
        force_float32_reductions=float32_arithmetic,
      )(inputs)
    return Affine()(normalised)


def check_norm(kind: str) -> str:
  """Returns kind, or raises a ValueError listing the valid norms."""
  if kind not in NORM_KINDS:
    raise ValueError(f"Unknown norm {kind!r}; valid norms: {', '.join(NORM_KINDS)}.")
  return kind


def activation_dtype(model_dtype: str, input_dtype: Any) -> Any:
  """The dtype a model computes in: its own, except that a float32 model keeps float64 inputs
  float64 (runs under jax.enable_x64, such as the loss-scale classification, stay exact)."""
  if model_dtype == "float32" and jnp.dtype(input_dtype) == jnp.float64:
    return jnp.float64
  return jnp.dtype(model_dtype)


def check_dtype(name: str) -> str:
  """Returns name, or raises a ValueError listing the valid model dtypes."""
  if name not in DTYPES:
    raise ValueError(f"Unknown model dtype {name!r}; valid dtypes: {', '.join(DTYPES)}.")
  return name


def count_parameters(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))
