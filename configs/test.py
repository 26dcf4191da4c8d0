"""A tiny CPU config for tests: a small CNN on 16x32 scenes, a few steps."""

import ml_collections

from configs import scenes


def get_config(argument: str | None = None) -> ml_collections.ConfigDict:
  config = scenes.get_config(argument)
  config.dataset.height, config.dataset.width = 16, 32
  config.dataset.num_train, config.dataset.num_validation, config.dataset.num_test = 64, 16, 16
  config.model.encoder = "small_cnn"
  config.model.features = (8, 8)
  config.model.norm = "group"
  config.model.head_hidden_channels = 8
  config.training.num_epochs = 2
  config.training.batch_size = 16
  config.training.eval_batch_size = 16
  config.training.log_every_steps = 2
  config.training.checkpoint_every_steps = 2
  config.training.async_checkpoints = False
  return config
