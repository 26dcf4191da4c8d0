"""Tests of the augmentation, DeepLabV3-ResNet50, pretrained backbones, and one train step per paper
config."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import celeba_resnet18
from configs import cityscapes_deeplab
from configs import cityscapes_segnet
from configs import nyuv2_deeplab
from configs import nyuv2_segnet
from mtl_jax import models
from mtl_jax import train
from mtl_jax.data import augment


def _blocky_batch(size=4, height=24, width=32):
  """Labels constant on 4x4 blocks; image, depth and normals are functions of the label."""
  rng = np.random.default_rng(1)
  blocks = rng.integers(0, 5, (size, height // 4, width // 4))
  labels = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2).astype(np.int32)
  normals = np.stack([labels + 1.0, -(labels + 2.0), labels * 0.5], axis=-1).astype(np.float32)
  return {
    "image": np.repeat((labels / 4.0)[..., None], 3, axis=-1).astype(np.float32),
    "segmentation": labels,
    "depth": (labels + 1.0).astype(np.float32),
    "normals": normals,
    "attributes": np.ones((size, 3), np.float32),
  }


def test_scale_crop_moves_all_maps_together_and_divides_depth():
  batch = _blocky_batch()
  out = augment.random_scale_crop(batch, np.random.default_rng(0), scales=(1.0, 1.2, 1.5))
  labels = out["segmentation"]
  scale = (labels + 1.0) / out["depth"]
  assert np.allclose(scale, scale[:, :1, :1]), "one scale per example"
  assert set(np.round(scale[:, 0, 0], 6)) <= {1.0, 1.2, 1.5}
  np.testing.assert_allclose(out["normals"][..., 0], labels + 1.0)
  # Where the label is constant around a pixel, bilinear image and nearest label agree.
  padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), mode="edge")
  neighbours = np.stack(
    [
      padded[:, 1 + dy : 1 + dy + labels.shape[1], 1 + dx : 1 + dx + labels.shape[2]]
      for dy in (-1, 0, 1)
      for dx in (-1, 0, 1)
    ]
  )
  interior = np.all(neighbours == labels[None], axis=0)
  assert interior.mean() > 0.3
  np.testing.assert_allclose(out["image"][..., 0][interior], (labels / 4.0)[interior], atol=1e-6)
  np.testing.assert_array_equal(out["attributes"], batch["attributes"])
  # Scale 1 is the identity.
  same = augment.random_scale_crop(batch, np.random.default_rng(0), scales=(1.0,))
  for key in batch:
    np.testing.assert_array_equal(same[key], batch[key])


def test_flip_mirrors_everything_and_negates_normal_x():
  batch = _blocky_batch()
  out = augment.random_horizontal_flip(batch, np.random.default_rng(3))
  flipped = ~np.all(out["segmentation"] == batch["segmentation"], axis=(1, 2))
  assert flipped.any() and not flipped.all()
  for index in range(len(flipped)):
    mirror = (lambda array: array[:, ::-1]) if flipped[index] else (lambda array: array)
    for key in ("image", "segmentation", "depth"):
      np.testing.assert_array_equal(out[key][index], mirror(batch[key][index]))
    sign = np.array([-1.0 if flipped[index] else 1.0, 1.0, 1.0], np.float32)
    np.testing.assert_array_equal(out["normals"][index], mirror(batch["normals"][index]) * sign)


def test_deeplabv3_resnet50_full_size_parameter_count():
  config = ml_collections.ConfigDict(
    dict(encoder="deeplabv3_resnet50", norm="batch", width_multiplier=1.0)
  )
  model = models.build_model(
    config, {"segmentation": models.HeadSpec(7, True), "depth": models.HeadSpec(1, True)}
  )
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 128, 256, 3)), train=False)
  )
  # torchvision's ResNet-50 without its classifier has 23,508,032 parameters.
  assert models.count_parameters(shapes["params"]["encoder"]) == 23_508_032
  heads = shapes["params"]["heads"]
  # ASPP (1x1, three dilated 3x3, pooling, projection) + 3x3 + classifier: about 16.1 M each.
  for task, channels in (("segmentation", 7), ("depth", 1)):
    expected = 2048 * 256 * (1 + 27 + 1) + 5 * 256 * 256 + 256 * 256 * 9 + 256 * channels + channels
    expected += 2 * 256 * 7  # Norm scales and biases of the 7 conv-norm-ReLU layers.
    assert models.count_parameters(heads[task]) == expected
  # Every parameter lives in a layers.Conv or layers.Affine (what the Gramian engine captures).
  for path, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
    assert path[-1].key in ("kernel", "bias", "scale") and (
      path[-2].key.endswith("_conv")
      or path[-2].key.startswith("Affine")
      or path[-2].key == "conv_output"
    ), path
  predictions = jax.eval_shape(
    lambda variables: model.apply(variables, jnp.zeros((2, 128, 256, 3)), train=False), shapes
  )
  assert predictions["segmentation"].shape == (2, 128, 256, 7) and predictions["depth"].shape == (
    2,
    128,
    256,
    1,
  )


@pytest.mark.parametrize("suffix", [".npz", ".msgpack"])
def test_pretrained_backbone_round_trip_and_mismatch(tmp_path, suffix):
  config = ml_collections.ConfigDict(dict(encoder="small_cnn", norm="batch", features=(4, 4)))
  model = models.build_model(config, {"depth": models.HeadSpec(1, True)})
  source = models.init_model(model, jax.random.PRNGKey(0), (1, 8, 8, 3))
  fresh = models.init_model(model, jax.random.PRNGKey(1), (1, 8, 8, 3))
  path = str(tmp_path / f"backbone{suffix}")
  models.save_backbone(path, source)
  loaded = models.load_backbone(fresh, path)
  jax.tree.map(
    np.testing.assert_array_equal, loaded["params"]["encoder"], source["params"]["encoder"]
  )
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["heads"], fresh["params"]["heads"])
  assert models.load_backbone(fresh, "") is fresh
  wider = models.build_model(
    ml_collections.ConfigDict(dict(encoder="small_cnn", norm="batch", features=(4, 6))),
    {"depth": models.HeadSpec(1, True)},
  )
  with pytest.raises(ValueError, match="another shape"):
    models.load_backbone(models.init_model(wider, jax.random.PRNGKey(0), (1, 8, 8, 3)), path)


# (config, height, width, width multiplier): every config's step is traced by default
# (`jax.eval_shape`: every shape and the config's wiring, no XLA compilation); the slow tier also
# compiles and runs one step of each encoder family's config (DeepLabV3-ResNet50 takes about a
# minute to compile on a cold cache; SegNet and ResNet-18 steps compile in other tests too).
_SIZES = [
  (cityscapes_segnet, 32, 64, 1 / 16),
  (cityscapes_deeplab, 16, 16, 1 / 32),
  (nyuv2_segnet, 32, 32, 1 / 16),
  (nyuv2_deeplab, 16, 16, 1 / 32),
  (celeba_resnet18, 16, 16, 1 / 16),
]
_COMPILED = (cityscapes_segnet, nyuv2_deeplab, celeba_resnet18)
_CONFIGS = [pytest.param(*size, False, id=size[0].__name__.split(".")[-1]) for size in _SIZES] + [
  pytest.param(
    *size, True, id=size[0].__name__.split(".")[-1] + "-compiled", marks=pytest.mark.slow
  )
  for size in _SIZES
  if size[0] in _COMPILED
]


def test_paper_configs_match_the_spec():
  expected = {
    cityscapes_segnet: (300, 64, 100),
    nyuv2_deeplab: (200, 8, 100),
    celeba_resnet18: (100, 512, 30),
  }
  for module, (epochs, batch_size, decay) in expected.items():
    config = module.get_config()
    assert (
      config.training.num_epochs,
      config.training.batch_size,
      config.optimizer.lr_decay_every_epochs,
    ) == (epochs, batch_size, decay)
    assert config.optimizer.weight_decay == 1e-5 and config.optimizer.lr_decay_factor == 0.5
    assert config.sweep.seeds == (0, 1, 2) and len(config.sweep.lr_grid) == 10
  assert nyuv2_segnet.get_config().tasks == ("segmentation", "depth", "normals")
  assert cityscapes_deeplab.get_config().model.encoder == "deeplabv3_resnet50"
  assert (nyuv2_segnet.get_config().dataset.height, nyuv2_segnet.get_config().dataset.width) == (
    288,
    384,
  )


@pytest.mark.parametrize("module, height, width, multiplier, compiled", _CONFIGS)
def test_one_train_step_per_paper_config(module, height, width, multiplier, compiled):
  config = module.get_config()
  config.dataset.height, config.dataset.width, config.dataset.validation_size = height, width, 2
  config.model.width_multiplier = multiplier
  config.training.batch_size = 2
  config.model.norm = "group"  # Batch statistics of 2 examples at 1x1 resolution are degenerate.
  if module is celeba_resnet18:
    config.tasks = (
      "Smiling",
      "Male",
    )  # 40 heads compile for minutes on a loaded CPU; 2 test the same code.
  with tfds.testing.mock_data(num_examples=6):
    experiment = train.build_experiment(config)
    if compiled:
      state = train.init_state(experiment, 0)
    else:
      state = jax.eval_shape(lambda: train.init_state(experiment, 0))
    batch = experiment.dataset.splits["train"].batch(np.arange(2))
  if experiment.dataset.augment is not None:
    batch = experiment.dataset.augment(batch, np.random.default_rng(0))
  step = train.make_train_step(
    experiment.model, experiment.tasks, experiment.weighting, experiment.optimizer
  )
  new_state, metrics = (jax.jit(step) if compiled else functools.partial(jax.eval_shape, step))(
    state, batch
  )
  assert metrics["task_losses"].shape == (len(config.tasks),)
  assert int(np.prod(metrics["loss"].shape)) == 1
  if compiled:
    assert np.isfinite(float(metrics["loss"])) and np.all(np.isfinite(metrics["task_losses"]))
    assert int(new_state.step) == 1
  else:
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
