"""Tests of batching: deterministic order by (seed, step) and padded evaluation batches."""

import numpy as np
import pytest

from mtl_jax.data import pipeline


def test_train_order_is_a_function_of_seed_and_step_and_covers_each_epoch():
  first = [pipeline.train_indices(10, 3, seed=4, step=step) for step in range(3)]
  again = [pipeline.train_indices(10, 3, seed=4, step=step) for step in range(3)]
  for left, right in zip(first, again):
    np.testing.assert_array_equal(left, right)
  seen = np.concatenate(first)
  assert len(set(seen.tolist())) == 9  # one epoch = 3 full batches, no repeats
  other_epoch = pipeline.train_indices(10, 3, seed=4, step=3)
  other_seed = pipeline.train_indices(10, 3, seed=5, step=0)
  assert not np.array_equal(other_epoch, first[0]) or not np.array_equal(other_seed, first[0])


def test_resumed_iteration_sees_the_same_batches():
  source = pipeline.ArraySource({"x": np.arange(20)})
  full = [
    batch["x"] for _, batch in pipeline.train_batches(source, 4, seed=1, start_step=0, num_steps=12)
  ]
  resumed = [
    batch["x"] for _, batch in pipeline.train_batches(source, 4, seed=1, start_step=7, num_steps=12)
  ]
  for left, right in zip(full[7:], resumed):
    np.testing.assert_array_equal(left, right)


def test_eval_batches_pad_the_last_batch_and_mask_it():
  source = pipeline.ArraySource({"x": np.arange(7)})
  batches = list(pipeline.eval_batches(source, 3))
  assert [batch["x"].shape for batch, _ in batches] == [(3,)] * 3
  seen = np.concatenate([batch["x"][mask] for batch, mask in batches])
  np.testing.assert_array_equal(seen, np.arange(7))


def test_errors_are_clear():
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.steps_per_epoch(3, 8)
  with pytest.raises(ValueError, match="disagree"):
    pipeline.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})
