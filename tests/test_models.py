"""Tests for mtl_jax.models: shapes, variable layout, pooling, errors, per-sample independence."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtl_jax import models
from mtl_jax.models import encoders
from mtl_jax.models import layers

BATCH = 2
IMAGE_SHAPE = (32, 64, 3)
WIDTH = 0.125
# Makes every SegNet/ResNet width the minimum of 4: initialisation compiles one random-number
# kernel per distinct parameter shape, which dominates the run time on CPU.
TINY_WIDTH = 0.005
NORMS = ("batch", "group", "layer", "none")
# deeplabv3_resnet50 (ASPP heads with norms, 2048-channel features, slow to compile) is
# tested in tests/test_paper_models_configs.py.
ENCODERS = tuple(name for name in models.ENCODERS if name != "deeplabv3_resnet50")
DENSE_CAPABLE = ("small_cnn", "segnet")


def make_config(encoder: str, norm: str, **overrides: Any) -> ml_collections.ConfigDict:
  values = dict(
    encoder=encoder,
    norm=norm,
    width_multiplier=WIDTH,
    hidden=(16, 16),
    features=(4, 8),
    head_hidden_channels=8,
    head_hidden=(6,),
    resnet_stem="cifar",
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def head_specs_for(encoder: str) -> dict[str, models.HeadSpec]:
  specs = {"label": models.HeadSpec(output_channels=5, dense=False)}
  if encoder in DENSE_CAPABLE:
    specs["segmentation"] = models.HeadSpec(output_channels=3, dense=True)
  return specs


def images(seed: int, batch: int = BATCH, shape: tuple[int, ...] = IMAGE_SHAPE) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, *shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def built(encoder: str, norm: str, width: float = WIDTH) -> tuple[models.MultiTaskModel, Any]:
  """A model and its variables, initialised once per test session (initialisation is slow)."""
  config = make_config(encoder, norm, width_multiplier=width)
  model = models.build_model(config, head_specs_for(encoder))
  variables = models.init_model(model, jax.random.PRNGKey(0), (BATCH, *IMAGE_SHAPE))
  return model, variables


def abstract_variables(model: nn.Module, shape: tuple[int, ...] = (BATCH, *IMAGE_SHAPE)) -> Any:
  return jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0), shape))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_output_shapes(encoder: str, norm: str) -> None:
  model = models.build_model(make_config(encoder, norm), head_specs_for(encoder))
  variables = abstract_variables(model)
  x = jax.ShapeDtypeStruct((BATCH, *IMAGE_SHAPE), jnp.float32)
  predictions = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  features = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False, method=models.MultiTaskModel.encode), variables, x
  )
  assert predictions["label"].shape == (BATCH, 5)
  assert all(prediction.dtype == jnp.float32 for prediction in predictions.values())
  if "segmentation" in predictions:
    assert predictions["segmentation"].shape == (BATCH, 32, 64, 3)
    assert features.shape[:3] == (BATCH, 32, 64)
  expected_channels = {"mlp": 16, "small_cnn": 8, "segnet": 8, "resnet18": 64}[encoder]
  assert features.shape[-1] == expected_channels
  assert ("batch_stats" in variables) == (norm == "batch")


@pytest.mark.parametrize("encoder", ENCODERS)
def test_params_tree_layout(encoder: str) -> None:
  model = models.build_model(make_config(encoder, "batch"), head_specs_for(encoder))
  variables = abstract_variables(model)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"encoder", "heads"}
  assert set(variables["params"]["heads"]) == set(head_specs_for(encoder))
  # Heads have no normalisation, so batch statistics live under 'encoder' only.
  assert set(variables["batch_stats"]) == {"encoder"}


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_resnet18_stems(stem: str) -> None:
  model = encoders.ResNet18(width_multiplier=WIDTH, norm="group", stem=stem)
  variables = abstract_variables(model, (BATCH, 64, 64, 3))
  features = jax.eval_shape(
    lambda v: model.apply(v, jnp.zeros((BATCH, 64, 64, 3)), train=False), variables
  )
  assert features.shape == (BATCH, 64)
  stem_kernel = variables["params"]["stem"]["conv"]["kernel"]
  assert stem_kernel.shape == ((7, 7, 3, 8) if stem == "imagenet" else (3, 3, 3, 8))


def test_single_task_model_has_one_head() -> None:
  model = models.build_model(make_config("mlp", "none"), {"only": models.HeadSpec(2, False)})
  variables = abstract_variables(model)
  assert set(variables) == {"params"}
  assert set(variables["params"]["heads"]) == {"only"}


def test_init_model_returns_variables_dict() -> None:
  _, variables = built("small_cnn", "batch")
  assert isinstance(variables, dict)
  assert set(variables) == {"params", "batch_stats"}
  assert models.count_parameters(variables["params"]) > 0


@pytest.mark.parametrize("encoder", ENCODERS)
def test_only_layers_modules_own_parameters(encoder: str) -> None:
  """Every parameter belongs to a layers.Dense, layers.Conv or layers.Affine (Gramian capture)."""
  model = models.build_model(make_config(encoder, "batch"), head_specs_for(encoder))
  module_types: dict[tuple[str, ...], type] = {}

  def record(next_fun, args, kwargs, context):
    module_types[tuple(context.module.path)] = type(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = abstract_variables(model)
  allowed = (layers.Dense, layers.Conv, layers.Affine)
  paths = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  assert paths
  for path, _ in paths:
    owner = tuple(entry.key for entry in path[:-1])
    assert module_types[owner] in allowed, (owner, module_types[owner])


def test_segnet_layout() -> None:
  model = encoders.SegNet(width_multiplier=WIDTH, norm="none")
  variables = abstract_variables(model)
  names = set(variables["params"])
  encoder_convs = sorted(name for name in names if name.startswith("encoder_"))
  decoder_convs = sorted(name for name in names if name.startswith("decoder_"))
  assert len(encoder_convs) == 13 and len(decoder_convs) == 13  # VGG-16 layout 2,2,3,3,3.
  assert variables["params"]["encoder_4_2"]["conv"]["kernel"].shape == (3, 3, 64, 64)
  assert variables["params"]["decoder_0_1"]["conv"]["kernel"].shape == (3, 3, 8, 8)
  assert model.filters == (8, 16, 32, 64, 64)


def test_batch_stats_update_in_train_and_are_used_in_eval() -> None:
  model, variables = built("small_cnn", "batch")
  x = images(1) * 3.0 + 1.0
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  old_stats = jax.tree_util.tree_leaves(variables["batch_stats"])
  new_stats = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(not np.allclose(old, new) for old, new in zip(old_stats, new_stats))

  updated = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  before = model.apply(variables, x, train=False)
  after = model.apply(updated, x, train=False)
  assert not np.allclose(before["label"], after["label"])
  # Evaluation uses running statistics, so samples do not affect each other.
  other = x.at[1].set(-x[1] * 5.0)
  changed = model.apply(updated, other, train=False)
  np.testing.assert_allclose(changed["label"][0], after["label"][0], rtol=1e-5, atol=1e-6)


def test_eval_mode_does_not_mutate_batch_stats() -> None:
  model, variables = built("small_cnn", "batch")
  _, updates = model.apply(variables, images(2), train=False, mutable=["batch_stats"])
  for old, new in zip(
    jax.tree_util.tree_leaves(variables["batch_stats"]), jax.tree_util.tree_leaves(updates)
  ):
    np.testing.assert_array_equal(old, new)


def test_max_pool_and_unpool_round_trip_with_tie() -> None:
  # One sample, 4x4, one channel: four 2x2 windows. The top-right window has a tie (7, 7) in
  # its first row; the first position in row-major order must win.
  x = jnp.array(
    [
      [1.0, 5.0, 7.0, 7.0],
      [3.0, 2.0, 0.0, 6.0],
      [-1.0, -4.0, 2.0, 2.0],
      [-2.0, -3.0, 2.0, 2.0],
    ]
  ).reshape(1, 4, 4, 1)
  pooled, mask = models.max_pool_with_mask(x)
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[5.0, 7.0], [-1.0, 2.0]])
  expected_mask = np.array(
    [
      [0, 1, 1, 0],
      [0, 0, 0, 0],
      [1, 0, 1, 0],
      [0, 0, 0, 0],
    ],
    dtype=np.float32,
  )
  np.testing.assert_array_equal(mask[0, :, :, 0], expected_mask)
  restored = models.max_unpool(pooled, mask)
  np.testing.assert_array_equal(restored[0, :, :, 0], x[0, :, :, 0] * expected_mask)
  # Exactly one position per window, for every sample and channel.
  random_mask = models.max_pool_with_mask(jnp.round(images(3, shape=(8, 8, 4))))[1]
  window_sums = random_mask.reshape(BATCH, 4, 2, 4, 2, 4).sum(axis=(2, 4))
  np.testing.assert_array_equal(window_sums, np.ones_like(window_sums))


def test_max_pool_gradient_goes_to_one_position_on_ties() -> None:
  x = jnp.full((1, 2, 2, 1), 3.0)
  gradient = jax.grad(lambda x: models.max_pool_with_mask(x)[0].sum())(x)
  np.testing.assert_array_equal(gradient[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_max_unpool_rejects_mismatched_mask() -> None:
  with pytest.raises(ValueError, match="mask shape"):
    models.max_unpool(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))


@pytest.mark.parametrize("height,width", [(48, 64), (32, 40)])
def test_segnet_rejects_sizes_not_divisible_by_32(height: int, width: int) -> None:
  model = encoders.SegNet(width_multiplier=WIDTH, norm="none")
  with pytest.raises(ValueError, match=r"divisible by 32.*Valid sizes"):
    abstract_variables(model, (1, height, width, 3))


def test_unknown_encoder_lists_valid_names() -> None:
  with pytest.raises(ValueError, match="mlp, small_cnn, segnet, resnet18"):
    models.build_model(make_config("vgg", "batch"), head_specs_for("mlp"))


def test_unknown_norm_lists_valid_names() -> None:
  with pytest.raises(ValueError, match="batch, group, layer, none"):
    models.build_model(make_config("mlp", "instance"), head_specs_for("mlp"))
  with pytest.raises(ValueError, match="batch, group, layer, none"):
    abstract_variables(encoders.SmallCNN(norm="instance"))


def test_unknown_resnet_stem_lists_valid_names() -> None:
  config = make_config("resnet18", "none", resnet_stem="tiny")
  model = models.build_model(config, head_specs_for("mlp"))
  with pytest.raises(ValueError, match="imagenet, cifar"):
    abstract_variables(model)


@pytest.mark.parametrize("encoder", ["mlp", "resnet18"])
def test_dense_head_on_global_encoder_raises(encoder: str) -> None:
  specs = {"depth": models.HeadSpec(output_channels=1, dense=True)}
  with pytest.raises(ValueError, match="dense encoder"):
    models.build_model(make_config(encoder, "none"), specs)


def test_dense_head_rejects_global_features() -> None:
  head = models.DenseHead(out_channels=2, hidden_channels=4)
  with pytest.raises(ValueError, match=r"per-pixel features \[B, H, W, C\]"):
    jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), jnp.zeros((2, 8))))


def test_small_cnn_dense_output_follows_heads() -> None:
  dense = models.build_model(make_config("small_cnn", "none"), head_specs_for("small_cnn"))
  global_only = models.build_model(make_config("small_cnn", "none"), head_specs_for("mlp"))
  assert dense.encoder.dense_output and not global_only.encoder.dense_output


def test_missing_config_keys_use_defaults() -> None:
  config = ml_collections.ConfigDict({"encoder": "mlp"})
  model = models.build_model(config, head_specs_for("mlp"))
  assert model.encoder.hidden == (256, 256) and model.encoder.norm == "batch"
  assert model.heads["label"].hidden == ()


def test_global_head_pools_dense_features() -> None:
  head = models.GlobalHead(out_channels=3, hidden=(4,))
  features = images(4, shape=(4, 6, 5))
  variables = head.init(jax.random.PRNGKey(0), features)
  pooled = head.apply(variables, features.mean(axis=(1, 2)))
  direct = head.apply(variables, features)
  assert direct.shape == (BATCH, 3) and direct.dtype == jnp.float32
  np.testing.assert_allclose(direct, pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["group", "layer", "none"])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_predictions_are_independent_across_samples(encoder: str, norm: str) -> None:
  """Sample 0's predictions must not depend on sample 1 (needed for per-sample gradients)."""
  model, variables = built(encoder, norm, TINY_WIDTH)
  # Training mode: that is where per-sample gradients are taken.
  predict = jax.jit(functools.partial(model.apply, train=True))
  x = images(6)
  other = x.at[1].set(images(7)[1] * 4.0 + 2.0)
  predictions, changed = predict(variables, x), predict(variables, other)
  for task in predictions:
    assert not np.allclose(predictions[task][1], changed[task][1])
    np.testing.assert_allclose(predictions[task][0], changed[task][0], rtol=1e-5, atol=1e-5)
