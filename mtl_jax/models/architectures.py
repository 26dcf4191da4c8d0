"""Multi-task architectures beside hard parameter sharing: MTAN, MMoE, CGC / PLE, Cross-stitch.

Every architecture keeps the variables tree `{'params': {'encoder': ..., 'heads': {task: ...}}}`
that the Gramian engine, the conflict probe and the per-task optimizers rely on. The rule that
decides where a parameter goes: under `encoder` when more than one task's loss depends on it
(the shared parameters: what enters the Gramian), under `heads[task]` when only that task's
loss does. `encoder` maps images to a pytree of shared representations, the same for every task;
`heads[task]` is a *tower*: the task's own modules, which pick and combine what the task needs
from that pytree, followed by the usual head (`heads[task]['head']`).

What is shared (encoder) and what is each task's (heads[task]), and the encoders supported:

* hps: the encoder | the head | every encoder.
* mtan: the encoder, tapped after every stage | attention masks and bridge convs, the head |
  small_cnn, segnet, resnet18.
* mmoe: `num_experts` copies of the encoder | a softmax gate over the experts, the head | all.
* cgc: `num_experts` shared experts | `num_task_experts` own experts, a gate, the head | all.
* ple: levels 1..L-1 but the task gates of level L-1 (their shared and task experts, the shared
  gates, lower task gates), level L's shared experts | level L-1's task gate, level L's own
  experts and gate, the head | all (L = `num_levels`).
* cross_stitch: one encoder column per task and the stitch units | the head | mlp, small_cnn.

Notes on the choices:

* MTAN (Liu et al. 2019): each task has an attention module per stage of the shared network,
  a mask a = sigmoid(conv1x1(relu(conv1x1([p_j, h_{j-1}])))) applied to the stage's output p_j;
  the masked features go through a 3x3 conv ("bridge") and are resized to the next stage, where
  they join its mask's input. The mask is computed from the stage's output (MTAN computes it
  from the stage's first conv) and the bridge convs are each task's own (MTAN's code shares
  them across the tasks' branches; a layer shared across branches that only exist per task
  would belong to no side of the split). The task's features are the last stage's masked
  output; a global head pools them.
* MMoE (Ma et al. 2018): the gate of task t, softmax(W_t x) on the flattened image, weighs the
  experts per sample. The gates are task-specific (only L_t depends on W_t), so they sit in the
  tower; the encoder passes the image on to them in its output.
* CGC / PLE (Tang et al. 2020): level 1's experts are encoder copies on the image; the experts
  of higher levels are a dense layer + norm + ReLU on their level's input (a 1x1 conv on
  per-pixel features), the width of the encoder's output. Level l < L has a gate per task
  (over the shared and that task's experts) and a shared gate (over all experts) that feeds the
  next level's shared experts, so every expert below level L reaches every task (shared), and
  so does every task gate below level L-1; a task gate of level L-1 feeds only its task's
  level L, so it is the task's.
  Gates read the flattened image at level 1 and the (spatially averaged) features above.
* Cross-stitch (Misra et al. 2016): T columns of the encoder; after every block a stitch unit
  replaces column t's activation with Σ_s α_ts x_s (α: T x T, one per stitch point, started at
  0.9 on the diagonal and 0.1 / (T - 1) off it). Every column feeds every task through the
  stitches, so all of it is shared; the stitch is a `layers.Dense` over the column axis, which
  the fast Gramian path sees like any other layer.

The fast Gramian path captures every encoder layer of these architectures (all are built from
`layers`, each called once), so it matches the reference path for all of them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models import encoders
from mtl_jax.models import layers

ARCHITECTURES = ("hps", "mtan", "mmoe", "cgc", "ple", "cross_stitch")
# Encoders each architecture can be built on; the others build on every encoder.
SUPPORTED_ENCODERS = {
  "mtan": ("small_cnn", "segnet", "resnet18"),
  "cross_stitch": ("mlp", "small_cnn"),
}


def check_architecture(architecture: str, encoder: str) -> None:
  """Raises a ValueError naming model.architecture unless it can be built on `encoder`."""
  if architecture not in ARCHITECTURES:
    raise ValueError(
      f"config.model.architecture: unknown {architecture!r}; valid: {', '.join(ARCHITECTURES)}."
    )
  supported = SUPPORTED_ENCODERS.get(architecture)
  if supported is not None and encoder not in supported:
    raise ValueError(
      f"config.model.architecture: {architecture!r} is built on the encoders "
      f"{', '.join(supported)}; got model.encoder {encoder!r}."
    )


# ------------------------------------------------------------------------------ shared helpers


def mix(gate_logits: jax.Array, experts: jax.Array) -> jax.Array:
  """Σ_e softmax(gate_logits)[b, e] experts[b, e, ...]: [B, E] and [B, E, ...] -> [B, ...]."""
  weights = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1).astype(experts.dtype)
  weights = weights.reshape(weights.shape + (1,) * (experts.ndim - 2))
  return jnp.sum(weights * experts, axis=1)


def gate_input(x: jax.Array, image: bool) -> jax.Array:
  """What a gate reads: the flattened image, or features averaged over positions: [B, D]."""
  if image:
    return x.reshape(x.shape[0], -1)
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def resize_to(x: jax.Array, height: int, width: int) -> jax.Array:
  """[B, h, w, C] -> [B, height, width, C]: 2x2 max-pools while twice too big, then nearest."""
  while x.shape[1] >= 2 * height and x.shape[2] >= 2 * width:
    x = encoders.max_pool_2x2(x)
  if x.shape[1:3] != (height, width):
    x = jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), method="nearest")
  return x


class DenseNormReLU(nn.Module):
  """Dense (over the last axis) -> norm -> ReLU; `features=0` keeps the input's width."""

  features: int
  norm: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = self.features or x.shape[-1]
    x = layers.Dense(width, kernel_init=nn.initializers.he_normal(), name="dense")(x)
    return nn.relu(layers.Norm(self.norm, name="norm")(x, train))


# ------------------------------------------------------------------------------------- MTAN


class AttentionMask(nn.Module):
  """MTAN's attention layer: conv1x1 -> norm -> ReLU -> conv1x1 -> norm -> sigmoid."""

  channels: int
  norm: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.Conv(self.channels, kernel_size=(1, 1), name="conv_0")(x)
    x = nn.relu(layers.Norm(self.norm, name="norm_0")(x, train))
    x = layers.Conv(self.channels, kernel_size=(1, 1), name="conv_1")(x)
    return nn.sigmoid(layers.Norm(self.norm, name="norm_1")(x, train))


class AttentionTower(nn.Module):
  """A task's MTAN branch over the shared stages' outputs, then its head."""

  task_head: nn.Module
  norm: str

  @nn.compact
  def __call__(self, stages: Sequence[jax.Array], train: bool = False) -> jax.Array:
    previous = None
    for index, stage in enumerate(stages):
      mask_input = stage
      if previous is not None:
        previous = resize_to(previous, stage.shape[1], stage.shape[2])
        mask_input = jnp.concatenate([stage, previous], axis=-1)
      attended = AttentionMask(stage.shape[-1], self.norm, name=f"attention_{index}")(
        mask_input, train
      )
      attended = attended * stage
      if index + 1 < len(stages):
        previous = encoders.ConvNormReLU(
          stages[index + 1].shape[-1], norm=self.norm, name=f"bridge_{index}"
        )(attended, train)
    return self.task_head.clone(parent=self, name="head")(attended, train)


# ------------------------------------------------------------------------------------- MMoE


class Experts(nn.Module):
  """MMoE's shared part: `count` copies of an encoder; returns their outputs and the image."""

  expert: nn.Module
  count: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    outputs = [
      self.expert.clone(parent=self, name=f"expert_{index}")(x, train)
      for index in range(self.count)
    ]
    return {"experts": jnp.stack(outputs, axis=1), "image": x}


class GatedTower(nn.Module):
  """An MMoE task: its softmax gate over the shared experts, then its head."""

  task_head: nn.Module

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    experts = features["experts"]
    logits = layers.Dense(experts.shape[1], name="gate")(gate_input(features["image"], True))
    return self.task_head.clone(parent=self, name="head")(mix(logits, experts), train)


# -------------------------------------------------------------------------------- CGC / PLE


def level_expert(expert: nn.Module, norm: str, level: int, parent: nn.Module, name: str):
  """An expert of a PLE level: a copy of the encoder at level 0, a DenseNormReLU above."""
  if level == 0:
    return expert.clone(parent=parent, name=name)
  return DenseNormReLU(0, norm, parent=parent, name=name)


class ExtractionNetwork(nn.Module):
  """The shared part of CGC / PLE: what of levels 1..L-1 reaches every task, and level L's
  shared experts.

  Returns {'shared': [B, E_s, ...] level L's shared experts, 'inputs': {task: ...}}, where a
  task's input is the image when L = 1 (CGC), and otherwise what its level L-1 gate mixes:
  {'experts': [B, E_s + E_t, ...], 'gate_input': that level's input for the task}. That gate
  leads only to the task's own level L (so it sits in the tower); the task gates of lower levels
  feed task experts whose outputs enter the next shared gate, so they reach every task.
  """

  expert: nn.Module
  task_names: Sequence[str]
  num_shared: int
  num_task: int
  num_levels: int
  norm: str

  def experts(self, level: int, owner: str, count: int, x: jax.Array, train: bool) -> list:
    return [
      level_expert(self.expert, self.norm, level, self, f"level_{level}_{owner}_expert_{e}")(
        x, train
      )
      for e in range(count)
    ]

  def gate(self, level: int, owner: str, x: jax.Array, experts: list) -> jax.Array:
    logits = layers.Dense(len(experts), name=f"level_{level}_{owner}_gate")(
      gate_input(x, level == 0)
    )
    return mix(logits, jnp.stack(experts, axis=1))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
    shared_input, inputs = x, {task: x for task in self.task_names}
    for level in range(self.num_levels - 1):
      shared = self.experts(level, "shared", self.num_shared, shared_input, train)
      own = {
        task: self.experts(level, task, self.num_task, inputs[task], train)
        for task in self.task_names
      }
      every_expert = shared + [e for task in self.task_names for e in own[task]]
      if level < self.num_levels - 2:
        inputs = {
          task: self.gate(level, task, inputs[task], shared + own[task]) for task in self.task_names
        }
      else:
        inputs = {
          task: {"experts": jnp.stack(shared + own[task], axis=1), "gate_input": inputs[task]}
          for task in self.task_names
        }
      shared_input = self.gate(level, "shared", shared_input, every_expert)
    last = self.num_levels - 1
    shared = self.experts(last, "shared", self.num_shared, shared_input, train)
    return {"shared": jnp.stack(shared, axis=1), "inputs": inputs}


class ExtractionTower(nn.Module):
  """A CGC / PLE task: its level L-1 gate (PLE), level L's own experts and gate over them and the
  shared ones, then its head."""

  task_head: nn.Module
  expert: nn.Module
  task: str
  num_task: int
  level: int
  norm: str

  @nn.compact
  def __call__(self, features: Mapping[str, Any], train: bool = False) -> jax.Array:
    x = features["inputs"][self.task]
    if self.level > 0:
      logits = layers.Dense(x["experts"].shape[1], name="previous_gate")(
        gate_input(x["gate_input"], self.level == 1)
      )
      x = mix(logits, x["experts"])
    own = [
      level_expert(self.expert, self.norm, self.level, self, f"expert_{e}")(x, train)
      for e in range(self.num_task)
    ]
    experts = jnp.concatenate([features["shared"], jnp.stack(own, axis=1)], axis=1)
    logits = layers.Dense(experts.shape[1], name="gate")(gate_input(x, self.level == 0))
    return self.task_head.clone(parent=self, name="head")(mix(logits, experts), train)


# ----------------------------------------------------------------------------- Cross-stitch


def stitch_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """α started near the identity: 0.9 on the diagonal, 0.1 / (T - 1) elsewhere (T = 1: 1)."""
  del key
  count = shape[0]
  if count == 1:
    return jnp.ones(shape, dtype)
  off = 0.1 / (count - 1)
  return (jnp.full(shape, off) + (0.9 - off) * jnp.eye(count)).astype(dtype)


class CrossStitchNetwork(nn.Module):
  """One column of the encoder per task, stitched after every block; returns {task: features}.

  Columns follow `encoder`'s own layout: an MLPEncoder's dense-norm-ReLU layers, or a
  SmallCNN's conv-norm-ReLU blocks (with its max-pools and final pooling when global).
  """

  encoder: nn.Module
  task_names: Sequence[str]

  def blocks(self, column: int) -> list:
    encoder = self.encoder
    if isinstance(encoder, encoders.MLPEncoder):
      return [
        DenseNormReLU(size, encoder.norm, name=f"column_{column}_layer_{index}")
        for index, size in enumerate(encoder.hidden)
      ]
    return [
      encoders.ConvNormReLU(size, norm=encoder.norm, name=f"column_{column}_block_{index}")
      for index, size in enumerate(encoder.features)
    ]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    count = len(self.task_names)
    mlp = isinstance(self.encoder, encoders.MLPEncoder)
    if mlp:
      x = x.reshape(x.shape[0], -1)
    blocks = [self.blocks(column) for column in range(count)]
    columns = [x] * count
    for index in range(len(blocks[0])):
      columns = [blocks[column][index](columns[column], train) for column in range(count)]
      stitched = layers.Dense(
        count, use_bias=False, kernel_init=stitch_init, name=f"stitch_{index}"
      )(jnp.stack(columns, axis=-1))
      columns = [stitched[..., column] for column in range(count)]
      pooled = not mlp and not self.encoder.dense_output and index + 1 < len(blocks[0])
      if pooled:
        columns = [encoders.max_pool_2x2(column) for column in columns]
    if not mlp and not self.encoder.dense_output:
      columns = [encoders.global_average_pool(column) for column in columns]
    return dict(zip(self.task_names, columns))


class ColumnTower(nn.Module):
  """A cross-stitch task: its own column's features into its head."""

  task_head: nn.Module
  task: str

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    return self.task_head.clone(parent=self, name="head")(features[self.task], train)


# ------------------------------------------------------------------------------------ factory


def build(
  architecture: str,
  encoder_name: str,
  encoder: nn.Module,
  heads: Mapping[str, nn.Module],
  options: Any,
) -> tuple[nn.Module, dict[str, nn.Module]]:
  """(shared module, {task: tower}) of `architecture` around an encoder and the task heads.

  Args:
    architecture: one of ARCHITECTURES; 'hps' returns `encoder` and `heads` unchanged.
    encoder_name: config.model.encoder (for the supported-encoder check).
    encoder: the hard-sharing encoder, the template of experts and columns.
    heads: task -> head, as hard sharing would use them.
    options: the model ConfigDict (num_experts, num_task_experts, num_levels, norm).
  """
  check_architecture(architecture, encoder_name)
  names = tuple(heads)
  if architecture == "hps":
    return encoder, dict(heads)
  if architecture == "mtan":
    towers = {task: AttentionTower(head, encoder.norm) for task, head in heads.items()}
    return encoder.clone(stage_outputs=True), towers
  if architecture == "mmoe":
    towers = {task: GatedTower(head) for task, head in heads.items()}
    return Experts(encoder, int(options.num_experts)), towers
  if architecture == "cross_stitch":
    towers = {task: ColumnTower(head, task) for task, head in heads.items()}
    return CrossStitchNetwork(encoder, names), towers
  levels = 1 if architecture == "cgc" else int(options.num_levels)
  shared = ExtractionNetwork(
    encoder,
    names,
    int(options.num_experts),
    int(options.num_task_experts),
    levels,
    encoder.norm,
  )
  towers = {
    task: ExtractionTower(
      head, encoder, task, int(options.num_task_experts), levels - 1, encoder.norm
    )
    for task, head in heads.items()
  }
  return shared, towers
