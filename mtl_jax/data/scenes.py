"""Procedural 3-D scenes, the embedded default data set: image, segmentation, depth, normals,
attributes.

Every example is rendered analytically by vectorised NumPy ray casting, so the data needs no
download and its labels are exact. A scene is a ground plane, an optional back wall and a few
spheres, boxes and cylinders resting on the floor (boxes and cylinders upright, boxes possibly
turned about the vertical axis), lit by one directional light (Lambertian shading, ambient term,
hard shadows) and seen through a pinhole camera that looks slightly down.

Conventions:

* World coordinates: x to the right, y up, z away from the camera (horizontal); the floor is y = 0.
* Camera coordinates: x to the right, y up, z along the viewing direction. 'depth' is the camera z
  coordinate of the visible surface point (z-depth, not the distance along the ray), and
  'normals' are unit vectors in camera coordinates, so a surface facing the camera has a negative
  z component.
* Pixels where the ray hits nothing (the sky) have class 0, depth exactly 0 and a zero normal;
  every other pixel has depth > 0 and a unit normal.

Example i of split s is a pure function of (seed, s, i): its random generator is
`np.random.default_rng([seed, split_id, i])`, so any subset, order or chunking of indices gives
the same arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("sky", "floor", "wall", "sphere", "box", "cylinder")
NUM_CLASSES: int = len(CLASS_NAMES)

OBJECT_KINDS: tuple[str, ...] = ("sphere", "box", "cylinder")
SPHERE, BOX, CYLINDER = 0, 1, 2
# Object kind k has segmentation class k + _FIRST_OBJECT_CLASS.
_FIRST_OBJECT_CLASS = CLASS_NAMES.index("sphere")

COLOUR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
PALETTE: np.ndarray = np.array(
  [
    [0.86, 0.14, 0.12],
    [0.18, 0.68, 0.22],
    [0.14, 0.28, 0.88],
    [0.92, 0.80, 0.14],
    [0.56, 0.22, 0.72],
    [0.12, 0.76, 0.80],
  ],
  dtype=np.float64,
)

ATTRIBUTE_NAMES: tuple[str, ...] = (
  "has_sphere",
  "has_box",
  "has_cylinder",
  "has_red_object",
  "has_blue_object",
  "at_least_3_objects",
  "largest_object_is_box",
  "leftmost_object_is_sphere",
  "objects_touch_or_overlap_in_image",
  "has_wall",
  "mostly_on_left",
  "light_from_left",
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Hit identifiers in the per-pixel hit map; object slot k is _FIRST_OBJECT_HIT + k.
_SKY_HIT, _FLOOR_HIT, _WALL_HIT, _FIRST_OBJECT_HIT = 0, 1, 2, 3
# Ray parameters below this count as self-intersections of a shadow ray with its own surface.
_EPSILON = 1e-6
_SHADOW_OFFSET = 1e-4


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """Every knob of the scene sampler and the renderer. Lengths are in world units, angles in
  degrees."""

  height: int = 32
  width: int = 64
  min_objects: int = 1
  max_objects: int = 5
  # Horizontal field of view; the vertical one follows from the aspect ratio (square pixels).
  field_of_view: float = 60.0
  camera_height: float = 1.8
  camera_pitch: float = 8.0
  # Object footprints are placed between these camera distances (world z).
  near_distance: float = 4.5
  far_distance: float = 9.0
  # Objects stay within this fraction of the horizontal half-field of view at their distance.
  lateral_fraction: float = 0.8
  sphere_radius: tuple[float, float] = (0.45, 0.9)
  box_half_width: tuple[float, float] = (0.35, 0.75)
  box_half_height: tuple[float, float] = (0.35, 0.85)
  cylinder_radius: tuple[float, float] = (0.3, 0.65)
  cylinder_half_height: tuple[float, float] = (0.4, 1.0)
  # Rejection sampling of non-intersecting footprints; an object that finds no room is dropped.
  placement_attempts: int = 30
  colour_jitter: float = 0.06
  wall_probability: float = 0.5
  wall_distance: tuple[float, float] = (10.0, 13.0)
  # Taller than the camera so the floor behind the wall is never visible over it.
  wall_height: tuple[float, float] = (2.2, 3.5)
  # The floor ends at this world z; beyond it (without a wall) is sky, which bounds the depth.
  floor_depth: float = 18.0
  floor_half_width: float = 40.0
  light_elevation: tuple[float, float] = (35.0, 65.0)
  # Azimuth away from the camera's own direction, to either side; below 90 the light is in front
  # of the wall and of the objects' camera-facing sides.
  light_azimuth: tuple[float, float] = (20.0, 85.0)
  ambient: float = 0.3
  shadows: bool = True
  # An object (or the wall) counts as visible for the attributes when it covers this share of
  # pixels.
  min_visible_fraction: float = 0.002

  def __post_init__(self) -> None:
    if self.height < 8 or self.width < 8:
      raise ValueError(f"Image size must be at least 8x8, got {self.height}x{self.width}.")
    if not 0 <= self.min_objects <= self.max_objects:
      raise ValueError(
        f"Need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}."
      )


@dataclasses.dataclass(frozen=True)
class Scene:
  """One scene: K objects as parallel arrays plus the light, sky, floor and wall.

  kinds: int [K], index into OBJECT_KINDS. centres: [K,3] world centres (resting objects have
  y = half height). sizes: [K,3] half extents along the object's own x, y, z (a sphere's are all
  its radius, a cylinder's are radius, half height, radius). rotations: [K] turn about the vertical
  axis in radians (only boxes use it). colours: [K,3] RGB; colour_ids: [K] index into COLOUR_NAMES.
  light_direction: unit [3] pointing towards the light. wall_distance is None without a wall.
  """

  kinds: np.ndarray
  centres: np.ndarray
  sizes: np.ndarray
  rotations: np.ndarray
  colours: np.ndarray
  colour_ids: np.ndarray
  light_direction: np.ndarray
  sky_colour: np.ndarray
  floor_colour: np.ndarray
  wall_colour: np.ndarray
  wall_distance: float | None = None
  wall_height: float = 3.0

  @property
  def num_objects(self) -> int:
    return int(len(self.kinds))


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """A hand-specified object resting on the floor at ground position (x, z), for `build_scene`.

  size: radius for a sphere; (half width x, half height, half depth z) for a box; (radius, half
  height) for a cylinder.
  """

  kind: str
  x: float
  z: float
  size: float | tuple[float, ...]
  colour: str = "red"
  rotation: float = 0.0


def light_direction_from_angles(elevation: float, azimuth: float) -> np.ndarray:
  """Unit vector towards a light at this elevation (degrees) and azimuth (degrees, positive = from
  the right).

  Azimuth 0 is a light behind the camera shining along the view; 90 is from the side.
  """
  elevation, azimuth = np.radians(elevation), np.radians(azimuth)
  return np.array(
    [np.cos(elevation) * np.sin(azimuth), np.sin(elevation), -np.cos(elevation) * np.cos(azimuth)]
  )


def build_scene(
  objects: Sequence[SceneObject],
  light_direction: Sequence[float] | None = None,
  wall_distance: float | None = None,
  wall_height: float = 3.0,
  sky_colour: Sequence[float] = (0.55, 0.72, 0.92),
  floor_colour: Sequence[float] = (0.6, 0.58, 0.55),
  wall_colour: Sequence[float] = (0.7, 0.68, 0.62),
) -> Scene:
  """A scene from hand-specified objects (each resting on the floor), e.g. for tests and figures."""
  kinds, centres, sizes, colour_ids = [], [], [], []
  for scene_object in objects:
    kind = OBJECT_KINDS.index(scene_object.kind)
    size = np.atleast_1d(np.asarray(scene_object.size, dtype=np.float64))
    if kind == SPHERE:
      half_extents = np.full(3, size[0])
    elif kind == BOX:
      half_extents = np.broadcast_to(size, (3,)).astype(np.float64)
    else:
      half_extents = np.array([size[0], size[-1], size[0]])
    kinds.append(kind)
    sizes.append(half_extents)
    centres.append([scene_object.x, half_extents[1], scene_object.z])
    colour_ids.append(COLOUR_NAMES.index(scene_object.colour))
  if light_direction is None:
    light_direction = light_direction_from_angles(50.0, -45.0)
  light = np.asarray(light_direction, dtype=np.float64)
  colour_ids_array = np.asarray(colour_ids, dtype=np.int64)
  return Scene(
    kinds=np.asarray(kinds, dtype=np.int64),
    centres=np.asarray(centres, dtype=np.float64).reshape(-1, 3),
    sizes=np.asarray(sizes, dtype=np.float64).reshape(-1, 3),
    rotations=np.asarray([o.rotation for o in objects], dtype=np.float64),
    colours=PALETTE[colour_ids_array].reshape(-1, 3),
    colour_ids=colour_ids_array,
    light_direction=light / np.linalg.norm(light),
    sky_colour=np.asarray(sky_colour, dtype=np.float64),
    floor_colour=np.asarray(floor_colour, dtype=np.float64),
    wall_colour=np.asarray(wall_colour, dtype=np.float64),
    wall_distance=wall_distance,
    wall_height=wall_height,
  )


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
  return float(rng.uniform(bounds[0], bounds[1]))


def sample_scene(rng: np.random.Generator, config: SceneConfig) -> Scene:
  """A random scene; the draws depend only on `rng` and the sampler fields of `config`."""
  num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
  half_view = np.tan(np.radians(config.field_of_view) / 2)
  kinds, centres, sizes, rotations, footprints, kept = [], [], [], [], [], []
  for index in range(num_objects):
    kind = int(rng.integers(len(OBJECT_KINDS)))
    if kind == SPHERE:
      radius = _uniform(rng, config.sphere_radius)
      half_extents = np.array([radius, radius, radius])
      footprint = radius
    elif kind == BOX:
      half_extents = np.array(
        [
          _uniform(rng, config.box_half_width),
          _uniform(rng, config.box_half_height),
          _uniform(rng, config.box_half_width),
        ]
      )
      footprint = float(np.hypot(half_extents[0], half_extents[2]))
    else:
      radius = _uniform(rng, config.cylinder_radius)
      half_extents = np.array([radius, _uniform(rng, config.cylinder_half_height), radius])
      footprint = radius
    rotation = float(rng.uniform(0, np.pi / 2)) if kind == BOX else 0.0
    # Always draw the same number of positions so later objects' draws don't depend on rejections.
    candidates_z = rng.uniform(config.near_distance, config.far_distance, config.placement_attempts)
    candidates_x = (
      rng.uniform(-1, 1, config.placement_attempts) * config.lateral_fraction * half_view
    )
    candidates_x = candidates_x * candidates_z
    for x, z in zip(candidates_x, candidates_z):
      if all(
        np.hypot(x - cx, z - cz) >= footprint + other
        for (cx, _, cz), other in zip(centres, footprints)
      ):
        kinds.append(kind)
        centres.append(np.array([x, half_extents[1], z]))
        sizes.append(half_extents)
        rotations.append(rotation)
        footprints.append(footprint)
        kept.append(index)
        break
  colour_ids = rng.integers(len(COLOUR_NAMES), size=num_objects)[kept]
  jitter = rng.uniform(-config.colour_jitter, config.colour_jitter, size=(num_objects, 3))[kept]
  colours = np.clip(PALETTE[colour_ids] + jitter, 0.0, 1.0)
  side = 1.0 if rng.random() < 0.5 else -1.0
  light = light_direction_from_angles(
    _uniform(rng, config.light_elevation), side * _uniform(rng, config.light_azimuth)
  )
  sky_colour = np.clip(np.array([0.55, 0.72, 0.92]) + rng.uniform(-0.08, 0.08, 3), 0.0, 1.0)
  floor_colour = np.array([0.62, 0.59, 0.55]) * rng.uniform(0.8, 1.15) + rng.uniform(-0.04, 0.04, 3)
  # Muted wall colours: mostly grey with a little hue, so the wall is not confused with objects.
  wall_colour = 0.75 * rng.uniform(0.6, 0.9) + 0.25 * rng.uniform(0.3, 0.9, 3)
  has_wall = rng.random() < config.wall_probability
  wall_distance = _uniform(rng, config.wall_distance)
  wall_height = _uniform(rng, config.wall_height)
  return Scene(
    kinds=np.asarray(kinds, dtype=np.int64),
    centres=np.asarray(centres, dtype=np.float64).reshape(-1, 3),
    sizes=np.asarray(sizes, dtype=np.float64).reshape(-1, 3),
    rotations=np.asarray(rotations, dtype=np.float64),
    colours=colours.reshape(-1, 3),
    colour_ids=np.asarray(colour_ids, dtype=np.int64),
    light_direction=light,
    sky_colour=sky_colour,
    floor_colour=np.clip(floor_colour, 0.0, 1.0),
    wall_colour=np.clip(wall_colour, 0.0, 1.0),
    wall_distance=wall_distance if has_wall else None,
    wall_height=wall_height,
  )


def camera_basis(config: SceneConfig) -> tuple[np.ndarray, np.ndarray]:
  """The camera position and the [3,3] matrix whose columns are the camera's x, y, z axes in world
  coordinates."""
  pitch = np.radians(config.camera_pitch)
  right = np.array([1.0, 0.0, 0.0])
  up = np.array([0.0, np.cos(pitch), np.sin(pitch)])
  forward = np.array([0.0, -np.sin(pitch), np.cos(pitch)])
  return np.array([0.0, config.camera_height, 0.0]), np.stack([right, up, forward], axis=1)


def camera_rays(config: SceneConfig) -> np.ndarray:
  """Per-pixel ray directions [H*W,3] in camera coordinates, scaled so their z component is 1.

  With that scaling the ray parameter of a hit is its z-depth. Rays go through pixel centres, row 0
  at the top.
  """
  half_width = np.tan(np.radians(config.field_of_view) / 2)
  half_height = half_width * config.height / config.width
  columns = ((np.arange(config.width) + 0.5) / config.width * 2 - 1) * half_width
  rows = (1 - (np.arange(config.height) + 0.5) / config.height * 2) * half_height
  x, y = np.meshgrid(columns, rows)
  return np.stack([x, y, np.ones_like(x)], axis=-1).reshape(-1, 3)


def _rotate_y(vectors: np.ndarray, angle: np.ndarray) -> np.ndarray:
  """Rotates [...,3] vectors about the vertical axis by angle [...] radians."""
  cosine, sine = np.cos(angle), np.sin(angle)
  x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
  return np.stack([cosine * x + sine * z, y, cosine * z - sine * x], axis=-1)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.einsum("...i,...i->...", a, b)


# The intersectors take broadcastable origins [...,3], directions [...,3] and object parameters and
# return the nearest ray parameter t > _EPSILON of the hit, or inf on a miss.


def _intersect_sphere(origins, directions, centres, radii) -> np.ndarray:
  offsets = origins - centres
  a = _dot(directions, directions)
  b = _dot(offsets, directions)
  c = _dot(offsets, offsets) - radii**2
  discriminant = b * b - a * c
  t = (-b - np.sqrt(np.maximum(discriminant, 0.0))) / a
  return np.where((discriminant >= 0) & (t > _EPSILON), t, np.inf)


def _intersect_box(origins, directions, centres, half_extents, rotations) -> np.ndarray:
  # Slab test in the box's own frame, one axis at a time to avoid stacking large temporaries.
  cosine, sine = np.cos(rotations), np.sin(rotations)
  offsets = origins - centres
  local_origins = (
    cosine * offsets[..., 0] - sine * offsets[..., 2],
    offsets[..., 1],
    sine * offsets[..., 0] + cosine * offsets[..., 2],
  )
  local_directions = (
    cosine * directions[..., 0] - sine * directions[..., 2],
    directions[..., 1],
    sine * directions[..., 0] + cosine * directions[..., 2],
  )
  t_enter, t_exit = -np.inf, np.inf
  for axis in range(3):
    direction = local_directions[axis]
    # Nudging zero components avoids 0 * inf = nan for rays parallel to a face.
    inverse = 1.0 / np.where(np.abs(direction) < 1e-12, 1e-12, direction)
    slab_a = (-half_extents[..., axis] - local_origins[axis]) * inverse
    slab_b = (half_extents[..., axis] - local_origins[axis]) * inverse
    t_enter = np.maximum(t_enter, np.minimum(slab_a, slab_b))
    t_exit = np.minimum(t_exit, np.maximum(slab_a, slab_b))
  return np.where((t_enter <= t_exit) & (t_enter > _EPSILON), t_enter, np.inf)


def _intersect_cylinder(origins, directions, centres, radii, half_heights) -> np.ndarray:
  offsets = origins - centres
  dx, dy, dz = directions[..., 0], directions[..., 1], directions[..., 2]
  ox, oy, oz = offsets[..., 0], offsets[..., 1], offsets[..., 2]
  with np.errstate(divide="ignore", invalid="ignore"):
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - radii**2
    discriminant = b * b - a * c
    t_side = (-b - np.sqrt(np.maximum(discriminant, 0.0))) / a
    side_hit = (
      (discriminant >= 0)
      & (a > 0)
      & (t_side > _EPSILON)
      & (np.abs(oy + t_side * dy) <= half_heights)
    )
    best = np.where(side_hit, t_side, np.inf)
    for cap in (half_heights, -half_heights):
      t_cap = (cap - oy) / dy
      radial = (ox + t_cap * dx) ** 2 + (oz + t_cap * dz) ** 2
      cap_hit = (t_cap > _EPSILON) & (radial <= radii**2)
      best = np.where(cap_hit & (t_cap < best), t_cap, best)
  return best


def _intersect_object(kind: int, origins, directions, centres, sizes, rotations) -> np.ndarray:
  if kind == SPHERE:
    return _intersect_sphere(origins, directions, centres, sizes[..., 0])
  if kind == BOX:
    return _intersect_box(origins, directions, centres, sizes, rotations)
  return _intersect_cylinder(origins, directions, centres, sizes[..., 0], sizes[..., 1])


def _object_normals(kind: int, points, centres, sizes, rotations) -> np.ndarray:
  """World unit normals [R,3] at surface points [R,3] of the objects with these parameters."""
  local = points - centres
  if kind == SPHERE:
    normals = local
  elif kind == BOX:
    local = _rotate_y(local, -rotations)
    # The face hit is the one the point is relatively closest to, i.e. the largest
    # |p| / half extent.
    axis = np.argmax(np.abs(local) / sizes, axis=-1)
    normals = np.zeros_like(local)
    rows = np.arange(len(local))
    normals[rows, axis] = np.sign(local[rows, axis])
    normals = _rotate_y(normals, rotations)
  else:
    radial = np.hypot(local[:, 0], local[:, 2]) / sizes[:, 0]
    on_cap = np.abs(local[:, 1]) / sizes[:, 1] >= radial
    normals = np.where(
      on_cap[:, None],
      np.stack([np.zeros_like(radial), np.sign(local[:, 1]), np.zeros_like(radial)], axis=-1),
      local * np.array([1.0, 0.0, 1.0]),
    )
  return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def _pad_scenes(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
  """Stacks the scenes' object arrays into [N,K,...] arrays, kind -1 marking empty slots."""
  count = len(scenes)
  slots = max([scene.num_objects for scene in scenes] + [0])
  padded = {
    "kinds": np.full((count, slots), -1, dtype=np.int64),
    "centres": np.zeros((count, slots, 3)),
    "sizes": np.ones((count, slots, 3)),
    "rotations": np.zeros((count, slots)),
    "colours": np.zeros((count, slots, 3)),
    "colour_ids": np.full((count, slots), -1, dtype=np.int64),
  }
  for index, scene in enumerate(scenes):
    k = scene.num_objects
    padded["kinds"][index, :k] = scene.kinds
    padded["centres"][index, :k] = scene.centres
    padded["sizes"][index, :k] = scene.sizes
    padded["rotations"][index, :k] = scene.rotations
    padded["colours"][index, :k] = scene.colours
    padded["colour_ids"][index, :k] = scene.colour_ids
  return padded


def _empty_render(height: int, width: int) -> dict[str, np.ndarray]:
  return {
    "image": np.zeros((0, height, width, 3), np.float32),
    "segmentation": np.zeros((0, height, width), np.int32),
    "depth": np.zeros((0, height, width), np.float32),
    "normals": np.zeros((0, height, width, 3), np.float32),
    "attributes": np.zeros((0, len(ATTRIBUTE_NAMES)), np.float32),
  }


def _trace_planes(scenes, config, camera_position, rays) -> tuple[np.ndarray, np.ndarray]:
  """(t [N,P], hit identifiers [N,P]) of the floor and wall, intersected in closed form for all
  pixels."""
  with np.errstate(divide="ignore", invalid="ignore"):
    t_floor = np.where(rays[:, 1] < 0, -camera_position[1] / rays[:, 1], np.inf)
  floor_points = camera_position + np.where(np.isfinite(t_floor), t_floor, 0.0)[:, None] * rays
  floor_inside = (np.abs(floor_points[:, 0]) <= config.floor_half_width) & (
    floor_points[:, 2] <= config.floor_depth
  )
  t_floor = np.where(floor_inside, t_floor, np.inf)

  wall_distances = np.array(
    [np.inf if s.wall_distance is None else s.wall_distance for s in scenes]
  )
  wall_heights = np.array([s.wall_height for s in scenes])
  with np.errstate(divide="ignore", invalid="ignore"):
    t_wall = (wall_distances[:, None] - camera_position[2]) / rays[None, :, 2]
    wall_y = camera_position[1] + t_wall * rays[None, :, 1]
  t_wall = np.where(
    np.isfinite(t_wall) & (t_wall > 0) & (wall_y >= 0) & (wall_y <= wall_heights[:, None]),
    t_wall,
    np.inf,
  )

  best_t = np.broadcast_to(t_floor, (len(scenes), rays.shape[0])).copy()
  hits = np.where(np.isfinite(best_t), _FLOOR_HIT, _SKY_HIT)
  closer = t_wall < best_t
  return np.where(closer, t_wall, best_t), np.where(closer, _WALL_HIT, hits)


def _trace_objects(objects, camera_position, rays, best_t, hits) -> None:
  """Updates (best_t, hits) in place with the nearest object hits.

  Per slot and kind, only the scenes that have that kind in that slot are traced.
  """
  for slot in range(objects["kinds"].shape[1]):
    for kind in range(len(OBJECT_KINDS)):
      members = np.flatnonzero(objects["kinds"][:, slot] == kind)
      if members.size == 0:
        continue
      t = _intersect_object(
        kind,
        camera_position,
        rays[None],
        objects["centres"][members, slot, None],
        objects["sizes"][members, slot, None],
        objects["rotations"][members, slot, None],
      )
      previous = best_t[members]
      closer = t < previous
      best_t[members] = np.where(closer, t, previous)
      hits[members] = np.where(closer, _FIRST_OBJECT_HIT + slot, hits[members])


def _class_and_colour(scenes, objects, hits) -> tuple[np.ndarray, np.ndarray]:
  """Per-scene lookup tables indexed by hit identifier: each pixel's class [N,P] and base colour
  [N,P,3]."""
  count = len(scenes)
  rows = np.arange(count)[:, None]
  class_table = np.concatenate(
    [np.broadcast_to([0, 1, 2], (count, 3)), objects["kinds"] + _FIRST_OBJECT_CLASS], axis=1
  )
  colour_table = np.concatenate(
    [
      np.zeros((count, 1, 3)),
      np.stack([s.floor_colour for s in scenes])[:, None],
      np.stack([s.wall_colour for s in scenes])[:, None],
      objects["colours"],
    ],
    axis=1,
  )
  return class_table[rows, hits], colour_table[rows, hits]


def _surface_normals(objects, hits, points) -> np.ndarray:
  """[N,P,3] world-space unit normals of the surfaces hit (zero for the sky)."""
  normals = np.zeros((*hits.shape, 3))
  normals[hits == _FLOOR_HIT] = (0.0, 1.0, 0.0)
  normals[hits == _WALL_HIT] = (0.0, 0.0, -1.0)
  for slot in range(objects["kinds"].shape[1]):
    scene_index, pixel_index = np.nonzero(hits == _FIRST_OBJECT_HIT + slot)
    kinds = objects["kinds"][scene_index, slot]
    for kind in range(len(OBJECT_KINDS)):
      chosen = kinds == kind
      if not chosen.any():
        continue
      scenes_chosen, pixels_chosen = scene_index[chosen], pixel_index[chosen]
      normals[scenes_chosen, pixels_chosen] = _object_normals(
        kind,
        points[scenes_chosen, pixels_chosen],
        objects["centres"][scenes_chosen, slot],
        objects["sizes"][scenes_chosen, slot],
        objects["rotations"][scenes_chosen, slot],
      )
  return normals


def render(scenes: Sequence[Scene], config: SceneConfig) -> dict[str, np.ndarray]:
  """Renders scenes into batched arrays with leading axis N (see the module docstring for
  conventions).

  Returns 'image' float32 [N,H,W,3] in [0,1], 'segmentation' int32 [N,H,W], 'depth' float32 [N,H,W],
  'normals' float32 [N,H,W,3] and 'attributes' float32 [N,A].
  """
  count, height, width = len(scenes), config.height, config.width
  if count == 0:
    return _empty_render(height, width)
  objects = _pad_scenes(scenes)
  camera_position, camera_axes = camera_basis(config)
  rays = camera_rays(config) @ camera_axes.T  # [P,3] world directions, camera z component 1.
  best_t, hits = _trace_planes(scenes, config, camera_position, rays)
  _trace_objects(objects, camera_position, rays, best_t, hits)

  valid = hits != _SKY_HIT
  depth = np.where(valid, best_t, 0.0)
  points = camera_position + depth[..., None] * rays[None]
  segmentation, base_colours = _class_and_colour(scenes, objects, hits)
  normals = _surface_normals(objects, hits, points)

  lights = np.stack([s.light_direction for s in scenes])
  diffuse = np.maximum(_dot(normals, lights[:, None]), 0.0)
  if config.shadows and objects["kinds"].shape[1]:
    diffuse = diffuse * ~_in_shadow(points, normals, diffuse > 0, lights, objects)
  shading = config.ambient + (1 - config.ambient) * diffuse
  sky = _sky(scenes, config).reshape(count, height * width, 3)
  image = np.where(valid[..., None], base_colours * shading[..., None], sky)

  camera_normals = normals @ camera_axes  # World to camera: dot with each camera axis.
  attributes = _attributes(hits.reshape(count, height, width), objects, lights, config)
  return {
    "image": np.clip(image, 0.0, 1.0).reshape(count, height, width, 3).astype(np.float32),
    "segmentation": segmentation.reshape(count, height, width).astype(np.int32),
    "depth": depth.reshape(count, height, width).astype(np.float32),
    "normals": camera_normals.reshape(count, height, width, 3).astype(np.float32),
    "attributes": attributes,
  }


def _in_shadow(points, normals, lit, lights, objects) -> np.ndarray:
  """[N,P] bool: whether the ray from each lit surface point towards the light hits an object."""
  # Whole rows of scenes are traced (as for the camera rays): contiguous slices are much cheaper
  # than gathering the lit pixels one by one, and unlit pixels are masked out at the end.
  origins = points + _SHADOW_OFFSET * normals
  blocked = np.zeros(lit.shape, dtype=bool)
  for slot in range(objects["kinds"].shape[1]):
    for kind in range(len(OBJECT_KINDS)):
      members = np.flatnonzero(objects["kinds"][:, slot] == kind)
      if members.size == 0:
        continue
      t = _intersect_object(
        kind,
        origins[members],
        lights[members, None],
        objects["centres"][members, slot, None],
        objects["sizes"][members, slot, None],
        objects["rotations"][members, slot, None],
      )
      blocked[members] |= np.isfinite(t)
  return blocked & lit


def _sky(scenes: Sequence[Scene], config: SceneConfig) -> np.ndarray:
  """[N,H,W,3] sky: the scene's sky colour at the top, paler towards the bottom."""
  paleness = np.linspace(0.0, 0.6, config.height)[:, None, None]
  colours = np.stack([s.sky_colour for s in scenes])
  sky = colours[:, None, None] * (1 - paleness) + paleness
  return np.broadcast_to(sky, (len(scenes), config.height, config.width, 3))


def _attributes(
  hits: np.ndarray, objects: dict[str, np.ndarray], lights: np.ndarray, config: SceneConfig
) -> np.ndarray:
  """[N,A] float32 attributes, decided from what is visible: hits is the [N,H,W] hit map."""
  count, height, width = hits.shape
  slots = objects["kinds"].shape[1]
  flat = hits.reshape(count, -1)
  minimum_pixels = max(1, int(round(config.min_visible_fraction * height * width)))
  # Per-scene, per-slot pixel counts and column sums through one bincount over (scene, slot) bins.
  object_pixels = flat >= _FIRST_OBJECT_HIT
  scene_index, pixel_index = np.nonzero(object_pixels)
  bins = scene_index * slots + flat[scene_index, pixel_index] - _FIRST_OBJECT_HIT
  areas = np.bincount(bins, minlength=count * slots).reshape(count, slots)
  column_sums = np.bincount(bins, weights=pixel_index % width, minlength=count * slots).reshape(
    count, slots
  )
  visible = areas >= minimum_pixels
  kinds, colour_ids = objects["kinds"], objects["colour_ids"]
  centroids = np.where(visible, column_sums / np.maximum(areas, 1), np.inf)
  any_visible = visible.any(axis=-1)
  rows = np.arange(count)
  largest = (
    np.argmax(np.where(visible, areas, -1), axis=-1) if slots else np.zeros(count, dtype=int)
  )
  leftmost = np.argmin(centroids, axis=-1) if slots else np.zeros(count, dtype=int)
  largest_kind = kinds[rows, largest] if slots else np.full(count, -1)
  leftmost_kind = kinds[rows, leftmost] if slots else np.full(count, -1)

  # Two different objects are adjacent (touching or occluding) when neighbouring pixels belong to
  # both.
  is_object = hits >= _FIRST_OBJECT_HIT
  horizontal = is_object[:, :, 1:] & is_object[:, :, :-1] & (hits[:, :, 1:] != hits[:, :, :-1])
  vertical = is_object[:, 1:, :] & is_object[:, :-1, :] & (hits[:, 1:, :] != hits[:, :-1, :])
  touching = horizontal.any(axis=(1, 2)) | vertical.any(axis=(1, 2))

  # Pixel centres are compared with the image centre, so a centred object is balanced.
  column_centres = np.arange(width) + 0.5
  left_pixels = (is_object & (column_centres < width / 2)).sum(axis=(1, 2))
  right_pixels = (is_object & (column_centres > width / 2)).sum(axis=(1, 2))

  values = {
    "has_sphere": (visible & (kinds == SPHERE)).any(axis=-1),
    "has_box": (visible & (kinds == BOX)).any(axis=-1),
    "has_cylinder": (visible & (kinds == CYLINDER)).any(axis=-1),
    "has_red_object": (visible & (colour_ids == COLOUR_NAMES.index("red"))).any(axis=-1),
    "has_blue_object": (visible & (colour_ids == COLOUR_NAMES.index("blue"))).any(axis=-1),
    "at_least_3_objects": visible.sum(axis=-1) >= 3,
    "largest_object_is_box": any_visible & (largest_kind == BOX),
    "leftmost_object_is_sphere": any_visible & (leftmost_kind == SPHERE),
    "objects_touch_or_overlap_in_image": touching,
    "has_wall": (flat == _WALL_HIT).sum(axis=-1) >= minimum_pixels,
    "mostly_on_left": left_pixels > right_pixels,
    "light_from_left": lights[:, 0] < 0,
  }
  assert tuple(values) == ATTRIBUTE_NAMES
  return (
    np.stack([values[name] for name in ATTRIBUTE_NAMES], axis=-1)
    .astype(np.float32)
    .reshape(count, -1)
  )


def _split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")
  return SPLITS.index(split)


def _chunk_size(config: SceneConfig) -> int:
  # About 256 images at 32x64 per chunk, fewer at higher resolution, to bound the working memory.
  return max(1, (256 * 32 * 64) // (config.height * config.width))


def generate(
  split: str, indices: np.ndarray | range | Sequence[int], config: SceneConfig, seed: int = 0
) -> dict[str, np.ndarray]:
  """Renders examples `indices` of `split`; example i depends only on (seed, split, i)."""
  split_id = _split_id(split)
  indices = [int(index) for index in np.asarray(indices, dtype=np.int64).reshape(-1)]
  scenes = [
    sample_scene(np.random.default_rng([seed, split_id, index]), config) for index in indices
  ]
  chunk = _chunk_size(config)
  parts = [render(scenes[start : start + chunk], config) for start in range(0, len(scenes), chunk)]
  if not parts:
    return render([], config)
  return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def load_split(
  split: str, num_examples: int, config: SceneConfig, seed: int = 0
) -> dict[str, np.ndarray]:
  """The first `num_examples` examples of `split`, rendered in memory-bounded chunks."""
  return generate(split, range(num_examples), config, seed)
