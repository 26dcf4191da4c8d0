"""An XLA:CPU miscompilation the library works around: the fault recorded, the workarounds pinned
(docs/xla_cpu_faults.md, fault 2).

XLA:CPU hands reductions to YNNPACK ("__ynn_fusion"). In a fusion of two sibling reductions over
the minor axis, one of them of a product with an operand broadcast along the leading axis, the
leading axis is cut into tiles of about 128 KiB of input and every tile after the first returns
the first tile's product reduction. The backward pass of a layer norm vmapped over cotangents
(`jax.vmap` of a VJP with a shared primal) is that pattern, which made the fast Gramian of a
layer-normalised SegNet wrong.

Two workarounds, each tested on its own: importing mtl_jax keeps YNNPACK away from reductions for
the whole process (`mtl_jax.avoid_known_miscompilations`, through XLA_FLAGS), and
`gramian.capture` applies one pullback per task (`gramian.stacked_vjp`), exact even with the
faulty fusion on. The programs that must show or avoid the fault are compiled with jaxlib
0.10.2's default fusion types (`DEFAULT_FUSIONS`), whatever the process flags say.

The tests marked xfail(strict=False) document the compiler: they fail while the fault is there
and report XPASS once a jaxlib fixes it (then the workarounds may be revisited). The others must
pass.
"""

from __future__ import annotations

import importlib.metadata
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gramian_cases
from mtl_jax import gramian
import mtl_jax
from mtl_jax.gramian import capture

ON_CPU = jax.default_backend() == "cpu"
cpu_only = pytest.mark.skipif(not ON_CPU, reason="documents an XLA:CPU fault")
compiler_fault = pytest.mark.xfail(
  ON_CPU,
  strict=False,
  reason=(
    "XLA:CPU YNNPACK reduce fusion returns the first tile's product reduction for later "
    "tiles (jaxlib 0.10.2)"
  ),
)
FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10.2's default YNNPACK fusion types (dot products and reductions), per program.
DEFAULT_FUSIONS = {FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# What importing mtl_jax sets for the process: dot products only.
WORKAROUND_FUSIONS = {FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# Tiles of about 128 KiB: rows of 48 KiB make tiles of two rows, so rows 2 and 3 are in the second.
ROWS, POSITIONS, CHANNELS = 4, 3072, 4


def _compiled(function, options, *arguments):
  """`function` jitted with these compiler options; skips where this XLA has no such option."""
  try:
    return jax.jit(function, compiler_options=options).lower(*arguments).compile()
  except Exception as error:
    if FUSION_OPTION in str(error):
      pytest.skip(f"this XLA has no such YNNPACK fusion option: {error}")
    raise


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _product_and_plain_sums(cotangents, primal):
  """Two sibling minor-axis reductions, one of a product with `primal` broadcast along the rows."""
  return jnp.sum(primal[None] * cotangents, axis=-1) + jnp.sum(cotangents, axis=-1)


def _product_inputs():
  generator = np.random.default_rng(0)
  cotangents = generator.normal(size=(ROWS, POSITIONS, CHANNELS)).astype(np.float32)
  primal = generator.normal(size=(POSITIONS, CHANNELS)).astype(np.float32)
  expected = _product_and_plain_sums(cotangents.astype(np.float64), primal.astype(np.float64))
  return cotangents, primal, expected


@cpu_only
@compiler_fault
def test_fused_sums_of_a_product_broadcast_along_the_leading_axis():
  cotangents, primal, expected = _product_inputs()
  actual = _compiled(_product_and_plain_sums, DEFAULT_FUSIONS, cotangents, primal)
  assert relative_error(actual(cotangents, primal), expected) < 1e-6


@cpu_only
def test_the_same_program_without_ynnpack_reductions_is_exact():
  # Pins the diagnosis: only the YNNPACK reduce fusion differs between this and the test above.
  cotangents, primal, expected = _product_inputs()
  actual = _compiled(_product_and_plain_sums, WORKAROUND_FUSIONS, cotangents, primal)
  assert relative_error(actual(cotangents, primal), expected) < 1e-6


@cpu_only
def test_importing_mtl_jax_keeps_ynnpack_away_from_reductions_in_this_process():
  if not importlib.metadata.version("jaxlib").startswith(mtl_jax.AFFECTED_JAXLIB_PREFIXES):
    pytest.skip("a jaxlib the workaround was not measured on")
  assert f"{mtl_jax.YNN_FUSION_FLAG}=" in os.environ.get("XLA_FLAGS", "")
  cotangents, primal, expected = _product_inputs()
  assert relative_error(jax.jit(_product_and_plain_sums)(cotangents, primal), expected) < 1e-6


def test_the_process_flag_is_added_once_and_never_over_the_users():
  environment = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert mtl_jax.avoid_known_miscompilations(environment, "0.10.2")
  assert environment["XLA_FLAGS"] == (
    "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=individual_dot"
  )
  assert not mtl_jax.avoid_known_miscompilations(environment, "0.10.2")
  users = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"}
  assert not mtl_jax.avoid_known_miscompilations(users, "0.10.2")
  assert users["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
  empty: dict = {}
  assert not mtl_jax.avoid_known_miscompilations(empty, "0.11.0") and empty == {}


def _layer_norm(inputs):
  return nn.LayerNorm(use_scale=False, use_bias=False).apply({}, inputs)


def _layer_norm_case():
  """Inputs [3, 32, 32, 4] (48 KiB) and four cotangents, with their eager VJPs one by one."""
  generator = np.random.default_rng(1)
  inputs = generator.normal(size=(3, 32, 32, 4)).astype(np.float32)
  cotangents = generator.normal(size=(4, 3, 32, 32, 4)).astype(np.float32)
  _, pullback = jax.vjp(_layer_norm, inputs)
  expected = np.stack([pullback(cotangent)[0] for cotangent in cotangents])
  return inputs, cotangents, expected


@cpu_only
@compiler_fault
def test_jitted_vmapped_layer_norm_pullback():
  inputs, cotangents, expected = _layer_norm_case()

  def vmapped(inputs, cotangents):
    _, pullback = jax.vjp(_layer_norm, inputs)
    return jax.vmap(pullback)(cotangents)[0]

  actual = _compiled(vmapped, DEFAULT_FUSIONS, inputs, cotangents)(inputs, cotangents)
  assert relative_error(actual, expected) < 1e-5


def test_jitted_stacked_layer_norm_pullback_equals_eager_pullbacks_even_with_the_faulty_fusion():
  inputs, cotangents, expected = _layer_norm_case()

  def stacked(inputs, cotangents):
    _, pullback = jax.vjp(_layer_norm, inputs)
    return gramian.stacked_vjp(pullback, cotangents)[0]

  actual = _compiled(stacked, DEFAULT_FUSIONS, inputs, cotangents)(inputs, cotangents)
  assert relative_error(actual, expected) < 1e-5


def test_jitted_capture_of_layer_normalised_cnn_equals_eager_even_with_the_faulty_fusion():
  # The workaround where it matters: every layer's output gradients for four tasks, at sizes
  # where the vmapped pullback is miscompiled (the first conv's outputs are [3, 32, 32, 4] per
  # task).
  case = gramian_cases.make_case("small_cnn", "layer", seed=0)

  def output_gradients(params):
    return capture.capture(case.model, params, {}, case.batch, case.tasks).output_gradients

  jitted = _compiled(output_gradients, DEFAULT_FUSIONS, case.params)(case.params)
  eager = output_gradients(case.params)
  assert set(jitted) == set(eager)
  for path in eager:
    assert relative_error(jitted[path], eager[path]) < 1e-5, path
