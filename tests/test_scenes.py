"""Tests for the procedural scene renderer: label consistency, determinism and exact hand-built
scenes."""

from __future__ import annotations

import numpy as np
import pytest

from mtl_jax.data import scenes

SMALL = scenes.SceneConfig(height=16, width=24)
# Odd sizes put a pixel centre exactly on the optical axis, where depths are easy to derive.
ODD = scenes.SceneConfig(height=33, width=65)


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
  return scenes.load_split("train", 40, SMALL, seed=1)


def _attributes(values: np.ndarray) -> dict[str, bool]:
  return {name: bool(value) for name, value in zip(scenes.ATTRIBUTE_NAMES, values)}


def _project(point: np.ndarray, config: scenes.SceneConfig) -> tuple[int, int]:
  """(row, column) of the pixel that sees a world point."""
  position, axes = scenes.camera_basis(config)
  x, y, z = axes.T @ (point - position)
  half_width = np.tan(np.radians(config.field_of_view) / 2)
  half_height = half_width * config.height / config.width
  column = (x / z / half_width + 1) / 2 * config.width - 0.5
  row = (1 - y / z / half_height) / 2 * config.height - 0.5
  return int(round(row)), int(round(column))


def _axis_object(kind: str, config: scenes.SceneConfig) -> tuple[scenes.SceneObject, float, float]:
  """An object whose front is crossed by the optical axis, with that hit's z-depth and ground
  distance."""
  pitch = np.radians(config.camera_pitch)
  if kind == "sphere":
    radius = 0.8
    # The optical axis passes through the centre: camera height - t sin(pitch) = radius.
    distance = (config.camera_height - radius) / np.sin(pitch)
    ground_z = distance * np.cos(pitch)
    return scenes.SceneObject("sphere", 0.0, ground_z, radius), distance - radius, ground_z
  ground_z = 7.0
  size = (0.7, 0.9, 0.5) if kind == "box" else (0.5, 0.9)
  front = ground_z - (size[2] if kind == "box" else size[0])
  # The axis meets the vertical front plane (box face or cylinder side at x = 0) at z = front.
  return scenes.SceneObject(kind, 0.0, ground_z, size), front / np.cos(pitch), ground_z


def test_shapes_dtypes_and_ranges(batch):
  count, height, width = 40, SMALL.height, SMALL.width
  assert batch["image"].shape == (count, height, width, 3) and batch["image"].dtype == np.float32
  assert (
    batch["segmentation"].shape == (count, height, width)
    and batch["segmentation"].dtype == np.int32
  )
  assert batch["depth"].shape == (count, height, width) and batch["depth"].dtype == np.float32
  assert (
    batch["normals"].shape == (count, height, width, 3) and batch["normals"].dtype == np.float32
  )
  assert batch["attributes"].shape == (count, len(scenes.ATTRIBUTE_NAMES))
  assert batch["attributes"].dtype == np.float32
  assert set(np.unique(batch["attributes"])) <= {0.0, 1.0}
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["segmentation"].min() >= 0 and batch["segmentation"].max() < scenes.NUM_CLASSES
  assert scenes.NUM_CLASSES == len(scenes.CLASS_NAMES) >= 6
  assert len(scenes.ATTRIBUTE_NAMES) >= 10


def test_class_depth_and_normals_agree(batch):
  valid = batch["segmentation"] != scenes.CLASS_NAMES.index("sky")
  assert np.array_equal(batch["depth"] > 0, valid)
  assert np.all(batch["depth"][~valid] == 0)
  assert np.all(batch["normals"][~valid] == 0)
  lengths = np.linalg.norm(batch["normals"], axis=-1)
  np.testing.assert_allclose(lengths[valid], 1.0, atol=1e-5)
  # Visible surfaces face the camera: the normal is against the viewing ray.
  rays = scenes.camera_rays(SMALL).reshape(SMALL.height, SMALL.width, 3)
  assert np.all(np.einsum("nhwc,hwc->nhw", batch["normals"], rays)[valid] < 1e-6)


def test_every_class_appears(batch):
  assert set(np.unique(batch["segmentation"])) == set(range(scenes.NUM_CLASSES))


def test_determinism_and_chunking(monkeypatch):
  full = scenes.generate("validation", range(6), SMALL, seed=3)
  again = scenes.load_split("validation", 6, SMALL, seed=3)
  subset = scenes.generate("validation", np.array([3, 4]), SMALL, seed=3)
  monkeypatch.setattr(scenes, "_chunk_size", lambda config: 2)
  chunked = scenes.generate("validation", [5, 4, 3, 2, 1, 0], SMALL, seed=3)
  for key in full:
    np.testing.assert_array_equal(full[key], again[key])
    np.testing.assert_array_equal(full[key][3:5], subset[key])
    np.testing.assert_array_equal(full[key][::-1], chunked[key])


def test_seeds_and_splits_differ():
  first = scenes.generate("train", range(3), SMALL, seed=0)
  assert not np.array_equal(
    first["image"], scenes.generate("train", range(3), SMALL, seed=1)["image"]
  )
  assert not np.array_equal(
    first["image"], scenes.generate("test", range(3), SMALL, seed=0)["image"]
  )


def test_unknown_split_lists_valid_ones():
  with pytest.raises(ValueError, match="train, validation, test"):
    scenes.generate("val", range(2), SMALL)


def test_config_validation():
  with pytest.raises(ValueError):
    scenes.SceneConfig(height=4)
  with pytest.raises(ValueError):
    scenes.SceneConfig(min_objects=3, max_objects=2)


@pytest.mark.parametrize("kind", scenes.OBJECT_KINDS)
def test_hand_built_object_on_optical_axis(kind):
  scene_object, expected_depth, _ = _axis_object(kind, ODD)
  result = scenes.render([scenes.build_scene([scene_object])], ODD)
  row, column = ODD.height // 2, ODD.width // 2
  assert result["segmentation"][0, row, column] == scenes.CLASS_NAMES.index(kind)
  np.testing.assert_allclose(result["depth"][0, row, column], expected_depth, rtol=1e-4)
  pitch = np.radians(ODD.camera_pitch)
  if kind == "sphere":
    # The axis goes through the centre, so the normal points straight back at the camera.
    expected_normal = np.array([0.0, 0.0, -1.0])
  else:
    # A vertical face looking at the camera, seen from slightly above.
    expected_normal = np.array([0.0, -np.sin(pitch), -np.cos(pitch)])
  np.testing.assert_allclose(result["normals"][0, row, column], expected_normal, atol=1e-5)


def test_hand_built_floor_pixel():
  scene_object, _, _ = _axis_object("sphere", ODD)
  result = scenes.render([scenes.build_scene([scene_object])], ODD)
  row, column = ODD.height - 1, ODD.width // 2
  assert result["segmentation"][0, row, column] == scenes.CLASS_NAMES.index("floor")
  pitch = np.radians(ODD.camera_pitch)
  # World up (0, 1, 0) expressed along the camera's right, up and forward axes.
  np.testing.assert_allclose(
    result["normals"][0, row, column], [0.0, np.cos(pitch), -np.sin(pitch)], atol=1e-6
  )
  _, axes = scenes.camera_basis(ODD)
  ray = axes @ scenes.camera_rays(ODD)[row * ODD.width + column]
  np.testing.assert_allclose(
    result["depth"][0, row, column], ODD.camera_height / -ray[1], rtol=1e-5
  )


def test_hand_built_wall_and_sky():
  scene = scenes.build_scene([], wall_distance=12.0, wall_height=2.5)
  result = scenes.render([scene], ODD)
  column = ODD.width // 2
  classes = result["segmentation"][0, :, column]
  # Top to bottom: sky, then the wall, then the floor.
  assert classes[0] == scenes.CLASS_NAMES.index("sky")
  assert classes[-1] == scenes.CLASS_NAMES.index("floor")
  wall_rows = np.flatnonzero(classes == scenes.CLASS_NAMES.index("wall"))
  assert wall_rows.size > 0 and np.all(np.diff(wall_rows) == 1)
  pitch = np.radians(ODD.camera_pitch)
  np.testing.assert_allclose(
    result["normals"][0, wall_rows[0], column], [0.0, -np.sin(pitch), -np.cos(pitch)], atol=1e-6
  )
  _, axes = scenes.camera_basis(ODD)
  ray = axes @ scenes.camera_rays(ODD)[wall_rows[0] * ODD.width + column]
  np.testing.assert_allclose(result["depth"][0, wall_rows[0], column], 12.0 / ray[2], rtol=1e-5)


def test_shadow_and_lambertian_shading():
  radius = 0.7
  light = scenes.light_direction_from_angles(30.0, 90.0)  # From the right, 30 degrees up.
  scene = scenes.build_scene(
    [scenes.SceneObject("sphere", 0.0, 6.0, radius, "green")], light_direction=light
  )
  result = scenes.render([scene], ODD)
  centre = scene.centres[0]
  # The light ray through the sphere's centre meets the floor in the middle of its shadow.
  shadowed = centre - light * centre[1] / light[1]
  lit = shadowed * np.array([-1.0, 1.0, 1.0])  # Mirrored to the sphere's lit side.
  floor = scenes.CLASS_NAMES.index("floor")
  ambient = ODD.ambient
  for point, brightness in ((shadowed, ambient), (lit, ambient + (1 - ambient) * light[1])):
    row, column = _project(point, ODD)
    assert result["segmentation"][0, row, column] == floor
    np.testing.assert_allclose(
      result["image"][0, row, column], scene.floor_colour * brightness, atol=1e-5
    )


def test_hand_built_attributes():
  wall = 12.0
  objects = [
    scenes.SceneObject("sphere", -2.2, 6.0, 0.6, "red"),
    scenes.SceneObject("cylinder", 0.0, 7.5, (0.4, 0.6), "green"),
    scenes.SceneObject("box", 2.2, 6.0, (0.9, 0.9, 0.9), "blue", rotation=0.3),
  ]
  right_light = scenes.light_direction_from_angles(50.0, 45.0)
  spread = scenes.build_scene(objects, light_direction=right_light, wall_distance=wall)
  # A sphere partly hidden behind another one, on the left, lit from the left, no wall.
  occluding = scenes.build_scene(
    [
      scenes.SceneObject("sphere", -1.0, 5.0, 0.6, "yellow"),
      scenes.SceneObject("sphere", -1.5, 7.0, 0.8, "purple"),
    ],
    light_direction=scenes.light_direction_from_angles(50.0, -45.0),
  )
  # An object completely hidden behind a bigger one does not count.
  hidden = scenes.build_scene(
    [
      scenes.SceneObject("box", 0.0, 5.0, (1.2, 1.2, 0.5), "cyan"),
      scenes.SceneObject("sphere", 0.0, 8.0, 0.4, "red"),
    ],
    light_direction=right_light,
  )
  result = scenes.render([spread, occluding, hidden], ODD)
  assert _attributes(result["attributes"][0]) == {
    "has_sphere": True,
    "has_box": True,
    "has_cylinder": True,
    "has_red_object": True,
    "has_blue_object": True,
    "at_least_3_objects": True,
    "largest_object_is_box": True,
    "leftmost_object_is_sphere": True,
    "objects_touch_or_overlap_in_image": False,
    "has_wall": True,
    "mostly_on_left": False,
    "light_from_left": False,
  }
  assert _attributes(result["attributes"][1]) == {
    "has_sphere": True,
    "has_box": False,
    "has_cylinder": False,
    "has_red_object": False,
    "has_blue_object": False,
    "at_least_3_objects": False,
    "largest_object_is_box": False,
    "leftmost_object_is_sphere": True,
    "objects_touch_or_overlap_in_image": True,
    "has_wall": False,
    "mostly_on_left": True,
    "light_from_left": True,
  }
  hidden_attributes = _attributes(result["attributes"][2])
  assert not hidden_attributes["has_sphere"] and not hidden_attributes["has_red_object"]
  assert hidden_attributes["has_box"] and hidden_attributes["largest_object_is_box"]


def test_attribute_base_rates_are_balanced():
  attributes = scenes.load_split("test", 300, SMALL)["attributes"]
  rates = dict(zip(scenes.ATTRIBUTE_NAMES, attributes.mean(axis=0).round(3)))
  print("attribute base rates:", rates)
  for name, rate in rates.items():
    assert 0.1 <= rate <= 0.9, (name, rate)


def test_large_resolution():
  result = scenes.generate("train", [0, 1], scenes.SceneConfig(height=128, width=256))
  assert result["image"].shape == (2, 128, 256, 3)
  valid = result["segmentation"] != 0
  assert np.array_equal(result["depth"] > 0, valid)


def test_scene_without_objects():
  config = scenes.SceneConfig(height=16, width=24, min_objects=0, max_objects=0)
  result = scenes.load_split("train", 4, config)
  assert result["segmentation"].max() <= scenes.CLASS_NAMES.index("wall")
  assert not result["attributes"][:, : scenes.ATTRIBUTE_NAMES.index("has_wall")].any()
