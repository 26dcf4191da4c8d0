"""Default experiment: SegNet-small on the embedded scenes, segmentation + depth + normals,
EW + Adam.

Launch:
  python experiments/train.py --config=configs/scenes.py --workdir=runs/scenes
Config argument (after a colon): comma-separated key=value pairs among
  task=<name>       a single-task (STL) run on that task
  method=<name>     the MTL method (default ew)
  optimizer=<name>  adam | sgd | signsgd | adamw
  lr=<float>        the learning rate
e.g. --config=configs/scenes.py:task=depth
  or --config=configs/scenes.py:method=uw,optimizer=sgd,lr=0.05
Any key can also be overridden with --config.<key>=<value>.
"""

import ml_collections

from configs import base

_ARGUMENTS = ("task", "method", "optimizer", "lr")


def parse_arguments(argument: str | None) -> dict[str, str]:
  """Parses 'key=value,key=value' and rejects unknown keys, listing the valid ones."""
  values: dict[str, str] = {}
  for item in filter(None, (argument or "").split(",")):
    key, separator, value = item.partition("=")
    if not separator or key not in _ARGUMENTS:
      raise ValueError(
        f"Bad config argument {item!r}; expected key=value with key in {', '.join(_ARGUMENTS)}."
      )
    values[key] = value
  return values


def apply_arguments(
  config: ml_collections.ConfigDict, argument: str | None
) -> ml_collections.ConfigDict:
  values = parse_arguments(argument)
  if "task" in values:
    config.tasks = (values["task"],)
  if "method" in values:
    config.method.name = values["method"]
  if "optimizer" in values:
    config.optimizer.name = values["optimizer"]
  if "lr" in values:
    config.optimizer.learning_rate = float(values["lr"])
  return config


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  return apply_arguments(base.get_config(), argument)
