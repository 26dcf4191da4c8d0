"""The shared-encoder multi-task model, and the factory that builds it from a config.

The variables tree is always `{'params': {'encoder': ..., 'heads': {task: ...}}}` (plus
`batch_stats` with the same layout for batch norm), so the shared parameters are exactly
`params['encoder']` and each task's own parameters are `params['heads'][task]`. A single-task
model is the same thing with one head. Under hard sharing (architecture 'hps') the encoder's
output is one array that every head reads; the other architectures (`architectures`) make it a
pytree and each task's head a tower that takes its part of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models import architectures
from mtl_jax.models import deeplab
from mtl_jax.models import encoders
from mtl_jax.models import heads as heads_lib
from mtl_jax.models import layers

ENCODERS = ("mlp", "small_cnn", "segnet", "resnet18", "deeplabv3_resnet50")
# Encoders whose output is per-pixel [B, H, W, C]; the others are global [B, D]. small_cnn is
# dense when any head needs it.
DENSE_ENCODERS = ("segnet", "deeplabv3_resnet50")
GLOBAL_ENCODERS = ("mlp", "resnet18")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """What a task's head must output: its channel count, and whether it is per-pixel."""

  output_channels: int
  dense: bool  # True: per-pixel task, prediction [B, H, W, C]; False: [B, C].


class Heads(nn.Module):
  """All task heads side by side; each task's head is a submodule named by the task."""

  tasks: Mapping[str, nn.Module]

  @nn.compact
  def __call__(self, features: jax.Array, train: bool) -> dict[str, jax.Array]:
    # Cloning under an explicit name makes the params tree {task: ...} rather than Flax's
    # default {'tasks_<task>': ...} for modules held in a dict attribute.
    return {
      task: head.clone(parent=self, name=task)(features, train) for task, head in self.tasks.items()
    }


class MultiTaskModel(nn.Module):
  """A shared encoder followed by one head per task; returns {task: prediction}.

  Attributes:
    encoder: maps images `[B, H, W, 3]` to features; called as `encoder(x, train)`.
    heads: task name -> head module; each is called as `head(features, train)`.
    dtype: the activations' dtype, 'float32' or 'bfloat16' (`layers.DTYPES`): images are cast to
      it on entry (float64 images stay float64 in a float32 model, `layers.activation_dtype`),
      and every layer computes in its input's dtype; predictions are float32 (float64 then).
  """

  encoder: nn.Module
  heads: Mapping[str, nn.Module]
  dtype: str = "float32"

  def setup(self) -> None:
    if not self.heads:
      raise ValueError("MultiTaskModel needs at least one head.")
    self.task_heads = Heads(dict(self.heads), name="heads")

  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    return self.predict_heads(self.encode(x, train), train)

  def encode(self, x: jax.Array, train: bool) -> jax.Array:
    """The shared features of a batch of images."""
    return self.encoder(x.astype(layers.activation_dtype(self.dtype, x.dtype)), train)

  def predict_heads(self, features: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Every task's prediction from shared features."""
    return self.task_heads(features, train)


def _int_tuple(values: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(value) for value in values)


def build_encoder(config: Any, dense_output: bool) -> nn.Module:
  """The encoder named by `config.encoder`; `dense_output` only matters for small_cnn."""
  name = config.get("encoder", None)
  if name not in ENCODERS:
    raise ValueError(f"Unknown encoder {name!r}; valid encoders: {', '.join(ENCODERS)}.")
  norm = layers.check_norm(config.get("norm", "batch"))
  width_multiplier = float(config.get("width_multiplier", 1.0))
  if name == "mlp":
    return encoders.MLPEncoder(hidden=_int_tuple(config.get("hidden", (256, 256))), norm=norm)
  if name == "small_cnn":
    return encoders.SmallCNN(
      features=_int_tuple(config.get("features", (16, 32, 32))),
      norm=norm,
      dense_output=dense_output,
    )
  if name == "segnet":
    return encoders.SegNet(width_multiplier=width_multiplier, norm=norm)
  if name == "deeplabv3_resnet50":
    return deeplab.DilatedResNet50(width_multiplier=width_multiplier, norm=norm)
  return encoders.ResNet18(
    width_multiplier=width_multiplier, norm=norm, stem=config.get("resnet_stem", "imagenet")
  )


def build_model(config: Any, head_specs: Mapping[str, HeadSpec]) -> MultiTaskModel:
  """A MultiTaskModel from a `model` ConfigDict and one HeadSpec per task.

  Config keys (missing ones take the defaults shown): encoder (one of ENCODERS, required),
  norm ('batch'), dtype ('float32'; or 'bfloat16' activations and matmuls, float32 parameters),
  width_multiplier (1.0; segnet, resnet18, deeplabv3_resnet50),
  hidden ((256, 256); mlp), features ((16, 32, 32); small_cnn), head_hidden_channels (64; dense
  heads other than deeplabv3_resnet50's ASPP heads, which have 256 x width_multiplier channels),
  head_hidden ((); global heads, () = linear), resnet_stem ('imagenet'; resnet18),
  architecture ('hps'; see `architectures`, with num_experts, num_task_experts and num_levels).
  """
  if not head_specs:
    raise ValueError("build_model needs at least one head spec.")
  name = config.get("encoder", None)
  if name not in ENCODERS:
    raise ValueError(f"Unknown encoder {name!r}; valid encoders: {', '.join(ENCODERS)}.")
  dense_tasks = sorted(task for task, spec in head_specs.items() if spec.dense)
  if dense_tasks and name in GLOBAL_ENCODERS:
    raise ValueError(
      f"Per-pixel (dense) task(s) {', '.join(dense_tasks)} need a dense encoder, but "
      f"{name!r} outputs global features [B, D]; use one of: "
      f"{', '.join(DENSE_ENCODERS + ('small_cnn',))}."
    )
  encoder = build_encoder(config, dense_output=bool(dense_tasks))
  width_multiplier = float(config.get("width_multiplier", 1.0))
  # MTAN initialises every SegNet conv, including the heads', with Xavier-normal.
  head_kernel_init = (
    nn.initializers.xavier_normal() if name == "segnet" else nn.initializers.lecun_normal()
  )
  head_hidden_channels = int(config.get("head_hidden_channels", 64))
  head_hidden = _int_tuple(config.get("head_hidden", ()))
  task_heads: dict[str, nn.Module] = {}
  for task, spec in head_specs.items():
    # DeepLabV3: every dense task gets its own ASPP head (upsampling to the input size).
    if spec.dense and name == "deeplabv3_resnet50":
      task_heads[task] = deeplab.ASPPHead(
        int(spec.output_channels),
        channels=encoders.scaled_width(256, width_multiplier),
        norm=encoder.norm,
      )
    elif spec.dense:
      task_heads[task] = heads_lib.DenseHead(
        int(spec.output_channels),
        hidden_channels=head_hidden_channels,
        kernel_init=head_kernel_init,
      )
    else:
      task_heads[task] = heads_lib.GlobalHead(
        int(spec.output_channels), hidden=head_hidden, kernel_init=head_kernel_init
      )
  dtype = layers.check_dtype(config.get("dtype", "float32"))
  encoder, task_heads = architectures.build(
    config.get("architecture", "hps"), name, encoder, task_heads, config
  )
  return MultiTaskModel(encoder=encoder, heads=task_heads, dtype=dtype)


def init_model(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
  """Initialises on a batch of zeros; returns {'params': ..., maybe 'batch_stats': ...}.

  The whole initialisation is one compiled program: run eagerly, every distinct parameter shape
  would compile its own random-number kernel, which takes seconds per shape on a CPU.
  """
  initialise = jax.jit(
    lambda key: model.init(key, jnp.zeros(tuple(input_shape), jnp.float32), train=False)
  )
  return dict(initialise(rng))
