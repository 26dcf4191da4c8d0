"""Task-specific heads: per-pixel (`DenseHead`) and per-image (`GlobalHead`), from `layers` only.

Heads are parameterised only through `layers.Dense` and `layers.Conv`, like the encoders, so the
Gramian engine sees them too. Predictions are float32: `[B, H, W, out]` or `[B, out]`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax import tasks as tasks_lib
from mtl_jax.models import layers


class DenseHead(nn.Module):
  """Per-pixel head: conv3x3 (C -> hidden) + ReLU + conv1x1 (hidden -> out), as in MTAN/SPEC.

  Its input must be per-pixel features `[B, H, W, C]` from a dense encoder.
  """

  out_channels: int
  hidden_channels: int = 64
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train  # No normalisation in heads; the argument keeps all modules' signatures alike.
    if features.ndim != 4:
      raise ValueError(
        "DenseHead needs per-pixel features [B, H, W, C] from a dense encoder (segnet, or "
        f"small_cnn with dense output); got features of shape {tuple(features.shape)}."
      )
    x = layers.Conv(
      self.hidden_channels, kernel_size=(3, 3), kernel_init=self.kernel_init, name="conv_hidden"
    )(features)
    x = nn.relu(x)
    x = layers.Conv(
      self.out_channels, kernel_size=(1, 1), kernel_init=self.kernel_init, name="conv_output"
    )(x)
    return tasks_lib.at_least_float32(x)


class GlobalHead(nn.Module):
  """Per-image head: global-average-pools `[B, H, W, C]` inputs, then an MLP to `[B, out]`.

  `hidden=()` gives a linear head; otherwise each hidden size is a Dense + ReLU.
  """

  out_channels: int
  hidden: Sequence[int] = ()
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train  # No normalisation in heads; the argument keeps all modules' signatures alike.
    if features.ndim == 4:
      features = jnp.mean(features, axis=(1, 2))
    if features.ndim != 2:
      raise ValueError(
        f"GlobalHead needs features [B, D] or [B, H, W, C]; got shape {tuple(features.shape)}."
      )
    x = features
    for index, size in enumerate(self.hidden):
      x = nn.relu(layers.Dense(size, kernel_init=self.kernel_init, name=f"dense_{index}")(x))
    x = layers.Dense(self.out_channels, kernel_init=self.kernel_init, name="dense_output")(x)
    return tasks_lib.at_least_float32(x)
