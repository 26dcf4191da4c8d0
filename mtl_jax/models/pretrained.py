"""Pretrained backbones from local files: write an encoder's variables, and merge them into fresh
ones.

A backbone file holds the encoder part of a model's variables, i.e. `params['encoder']` (and
`batch_stats['encoder']` when the encoder has batch norm), in one of two formats:

- `.npz`: one array per leaf, keyed `'params/<module>/.../<leaf>'` or `'batch_stats/...'`
  (paths relative to the encoder; a key without a collection prefix is a param);
- `.msgpack`: `flax.serialization.msgpack_serialize({'params': ..., 'batch_stats': ...})`.

Converting other weights (e.g. torchvision's ImageNet ResNet-50) means writing such a file with
our module names (see `save_backbone` and the param tree of `init_model`). Nothing is
downloaded. Loading is strict: every param of the encoder must be in the file with the same
shape, and the file may hold nothing else; a batch_stats collection is optional.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import numpy as np

_COLLECTIONS = ("params", "batch_stats")


def _flatten(tree: Any) -> dict[str, np.ndarray]:
  return {
    "/".join(path): np.asarray(value)
    for path, value in flax.traverse_util.flatten_dict(dict(tree)).items()
  }


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  return flax.traverse_util.unflatten_dict(
    {tuple(key.split("/")): value for key, value in flat.items()}
  )


def save_backbone(path: str, variables: Any) -> None:
  """Writes the encoder part of model variables ({'params': {'encoder': ...}, ...}) to path
  (.npz or .msgpack)."""
  collections = {
    name: variables[name]["encoder"]
    for name in _COLLECTIONS
    if name in variables and "encoder" in variables[name]
  }
  if path.endswith(".npz"):
    flat = {
      f"{name}/{key}": value
      for name, tree in collections.items()
      for key, value in _flatten(tree).items()
    }
    np.savez(path, **flat)
  elif path.endswith(".msgpack"):
    with open(path, "wb") as file:
      file.write(flax.serialization.msgpack_serialize(flax.core.unfreeze(collections)))
  else:
    raise ValueError(f"Backbone file {path!r} must end in .npz or .msgpack.")


def read_backbone(path: str) -> dict[str, dict[str, np.ndarray]]:
  """collection -> flat {'module/.../leaf': array} from a backbone file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.model.pretrained_backbone file {path!r} does not exist.")
  flat: dict[str, dict[str, np.ndarray]] = {name: {} for name in _COLLECTIONS}
  if path.endswith(".npz"):
    with np.load(path) as archive:
      for key in archive.files:
        collection, _, rest = key.partition("/")
        if collection in _COLLECTIONS and rest:
          flat[collection][rest] = archive[key]
        else:
          flat["params"][key] = archive[key]
  elif path.endswith(".msgpack"):
    with open(path, "rb") as file:
      restored = flax.serialization.msgpack_restore(file.read())
    if not set(restored) <= set(_COLLECTIONS):
      restored = {"params": restored}  # A bare params tree.
    for collection, tree in restored.items():
      flat[collection] = _flatten(tree)
  else:
    raise ValueError(f"config.model.pretrained_backbone {path!r} must end in .npz or .msgpack.")
  return flat


def load_backbone(variables: dict[str, Any], path: str) -> dict[str, Any]:
  """Returns variables with the encoder's params (and batch_stats, when present) replaced from path.

  Args:
    variables: freshly initialised model variables {'params': {'encoder': ..., 'heads': ...}, ...}.
    path: a backbone file ('' returns variables unchanged).

  Raises:
    ValueError: keys or shapes in the file do not match the encoder (the message lists them).
  """
  if not path:
    return variables
  stored = read_backbone(path)
  merged = dict(variables)
  for collection in _COLLECTIONS:
    if collection not in variables or "encoder" not in variables[collection]:
      if stored[collection]:
        raise ValueError(f"{path} has {collection} but the model's encoder has none.")
      continue
    if collection == "batch_stats" and not stored[collection]:
      continue  # Running statistics are optional: they start fresh.
    current = _flatten(variables[collection]["encoder"])
    missing = sorted(set(current) - set(stored[collection]))
    unexpected = sorted(set(stored[collection]) - set(current))
    mismatched = [
      f"{key}: file {stored[collection][key].shape} vs model {current[key].shape}"
      for key in sorted(set(current) & set(stored[collection]))
      if stored[collection][key].shape != current[key].shape
    ]
    if missing or unexpected or mismatched:
      raise ValueError(
        f"Pretrained backbone {path} does not match the encoder ({collection}): {len(missing)} "
        f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
        f"{len(mismatched)} with another shape (e.g. {mismatched[:3]}). Check config.model.encoder "
        "and width_multiplier against the file."
      )
    encoder = _unflatten(
      {key: np.asarray(value, current[key].dtype) for key, value in stored[collection].items()}
    )
    merged[collection] = {**variables[collection], "encoder": encoder}
  return merged
