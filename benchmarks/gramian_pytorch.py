"""Benchmark of the fast Gramian against PyTorch's per-sample gradient methods on the same model.

The issue's yardstick for the Gramian engine is the PyTorch ecosystem: per-sample, per-task
gradients of the shared encoder and their B×T Gramian, on the same model and machine. This
script builds `benchmarks/gramian.py`'s case (T = 3 tasks, 32×32×3 images, GroupNorm encoder),
copies its Flax parameters into an equivalent `torch.nn.Module`, checks that every PyTorch
method's Gramian equals the JAX fast Gramian, and then times, interleaved in one process
(medians):

* JAX: the plain EW step, and the fast Gramian step (loss, gradients of all parameters AND the
  [B, T, B, T] Gramian: strictly more output than the PyTorch methods below produce);
* PyTorch, plain EW step (forward + backward of the summed task losses), for scale;
* `torch.func` vmap(jacrev): per-sample Jacobian of the T task losses, then J Jᵀ;
* `torch.func` vmap(grad) per task: T vmapped per-sample gradients, then J Jᵀ;
* Opacus `GradSampleModule` (hook-based per-sample gradients): one forward and backward per
  task, `grad_sample` stacked, then J Jᵀ;
* a Python loop of `torch.autograd.grad` over samples and tasks (only at the smallest batch
  size unless `--loop-all`, since it is B·T backward calls).

The last column is each method's largest Gramian entry difference from the JAX fast Gramian,
relative to the largest entry. Two exact computations in float32 can differ at 1e-3 there: a
sample with a pre-activation within rounding of zero (|x| ~ 1e-6 was seen) takes the other side
of a ReLU in one framework, and that sample's rows then differ legitimately.

PyTorch and Opacus are not dependencies of mtl_jax: install them beside it to run this script
(`pip install torch opacus`; on a machine with a local CPU wheel, `pip install torch==<version>`
first so pip does not fetch a CUDA build).

  python benchmarks/gramian_pytorch.py [--rounds 9] [--batch-sizes 64,128] [--encoders ...]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
import warnings

try:
  import torch
  import torch.func
except ImportError as error:  # pragma: no cover - depends on the environment
  raise SystemExit(
    "benchmarks/gramian_pytorch.py compares against PyTorch, which mtl_jax does not depend "
    f"on ({error}). Install it beside mtl_jax: pip install torch opacus"
  ) from error

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtl_jax import gramian  # noqa: E402
from mtl_jax import tasks as tasks_lib  # noqa: E402
from mtl_jax.models import layers  # noqa: E402


def _load_gramian_benchmark():
  """benchmarks/gramian.py as a module: the case (model, params, batch) is defined there once."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gramian.py")
  spec = importlib.util.spec_from_file_location("gramian_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CASE = _load_gramian_benchmark()
# Methods whose warm-up call took less than this are called once untimed before each timed call.
CHEAP_SECONDS = 0.5
PAUSE_SECONDS = 0.05
# A relative Gramian difference above this is not ReLU-kink round-off (see the docstring).
MISMATCH = 1e-2


def _tensor(array) -> torch.Tensor:
  return torch.tensor(np.asarray(array, dtype=np.float32))


def _group_norm(channels: int, positions: int, node) -> torch.nn.GroupNorm:
  """mtl_jax's Norm('group') (statistics, then Affine) as one torch GroupNorm."""
  groups = layers._group_count(channels, positions=positions)  # The same rule as the Flax model.
  norm = torch.nn.GroupNorm(groups, channels, eps=1e-5, affine=True)
  norm.weight.data = _tensor(node["Affine_0"]["scale"])
  norm.bias.data = _tensor(node["Affine_0"]["bias"])
  return norm


def _linear(node) -> torch.nn.Linear:
  kernel = np.asarray(node["kernel"])
  linear = torch.nn.Linear(*kernel.shape)
  linear.weight.data = _tensor(kernel.T)
  linear.bias.data = _tensor(node["bias"])
  return linear


def _conv(node) -> torch.nn.Conv2d:
  kernel = np.asarray(node["kernel"])  # HWIO
  conv = torch.nn.Conv2d(
    kernel.shape[2], kernel.shape[3], kernel.shape[:2], padding=kernel.shape[0] // 2
  )
  conv.weight.data = _tensor(kernel.transpose(3, 2, 0, 1))
  conv.bias.data = _tensor(node["bias"])
  return conv


class TorchModel(torch.nn.Module):
  """The Flax case's model in PyTorch, with its parameters: an encoder and one linear head per
  task."""

  def __init__(self, encoder_kind: str, params, image_shape):
    super().__init__()
    encoder = params["encoder"]
    modules: list[torch.nn.Module] = []
    if encoder_kind == "mlp":
      # Flax flattens NHWC images; the torch model receives the same NHWC tensor.
      modules.append(torch.nn.Flatten())
      for index in range(len(encoder) // 2):
        dense = encoder[f"dense_{index}"]
        modules += [
          _linear(dense),
          _group_norm(np.shape(dense["kernel"])[1], 1, encoder[f"norm_{index}"]),
          torch.nn.ReLU(),
        ]
    else:
      height, width = image_shape[:2]
      blocks = sorted(encoder, key=lambda name: int(name.split("_")[1]))
      for index, name in enumerate(blocks):
        block = encoder[name]
        channels = np.shape(block["conv"]["kernel"])[3]
        modules += [
          _conv(block["conv"]),
          _group_norm(channels, height * width, block["norm"]),
          torch.nn.ReLU(),
        ]
        if index < len(blocks) - 1:
          modules.append(torch.nn.MaxPool2d(2))
          height, width = height // 2, width // 2
      modules.append(torch.nn.AdaptiveAvgPool2d(1))
      modules.append(torch.nn.Flatten())
    self.encoder_kind = encoder_kind
    self.encoder = torch.nn.Sequential(*modules)
    self.heads = torch.nn.ModuleDict(
      {name: _linear(head["dense_output"]) for name, head in params["heads"].items()}
    )

  def model_layout(self, images: torch.Tensor) -> torch.Tensor:
    """NHWC images as this model takes them: NCHW and contiguous for the CNN.

    (Contiguous matters beyond speed: Opacus 1.6's conv per-sample gradients came out wrong for
    a permuted, channels-last input.)
    """
    return images if self.encoder_kind == "mlp" else images.permute(0, 3, 1, 2).contiguous()

  def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-task outputs of model-layout images."""
    features = self.encoder(images)
    return {name: head(features) for name, head in self.heads.items()}


def task_losses(outputs: dict[str, torch.Tensor], labels, attributes) -> torch.Tensor:
  """Per-sample losses [B, T] in CASE.TASKS order, as mtl_jax.tasks defines them."""
  columns = []
  for task in CASE.TASKS:
    prediction = outputs[task.name]
    if isinstance(task, tasks_lib.Classification):
      columns.append(torch.nn.functional.cross_entropy(prediction, labels, reduction="none"))
    elif isinstance(task, tasks_lib.BinaryAttribute):
      columns.append(
        torch.nn.functional.binary_cross_entropy_with_logits(
          prediction[:, 0], attributes[:, task.index], reduction="none"
        )
      )
    else:
      raise ValueError(f"No PyTorch loss for task type {type(task).__name__} in this benchmark.")
  return torch.stack(columns, dim=1)


def _gram(rows: torch.Tensor, batch: int) -> torch.Tensor:
  rows = rows.reshape(batch * len(CASE.TASKS), -1)
  return (rows @ rows.T).reshape(batch, len(CASE.TASKS), batch, len(CASE.TASKS))


class TorchMethods:
  """Each method returns the [B, T, B, T] Gramian of the encoder's per-sample, per-task
  gradients."""

  def __init__(self, model: TorchModel, batch):
    self.model = model
    self.images = model.model_layout(_tensor(batch["image"]))
    self.labels = torch.from_numpy(np.asarray(batch["label"]).astype(np.int64))
    self.attributes = _tensor(batch["attributes"])
    self.batch = self.images.shape[0]
    self.encoder_params = dict(model.encoder.named_parameters())
    self.head_params = {
      name: {key: value.detach() for key, value in head.named_parameters()}
      for name, head in model.heads.items()
    }

  def _sample_losses(self, encoder_params, image, label, attribute):
    """Per-task losses [T] of one sample, functional in the encoder's parameters."""
    features = torch.func.functional_call(self.model.encoder, encoder_params, (image[None],))
    outputs = {
      name: torch.func.functional_call(head, self.head_params[name], (features,))
      for name, head in self.model.heads.items()
    }
    return task_losses(outputs, label[None], attribute[None])[0]

  def plain_step(self):
    self.model.zero_grad(set_to_none=True)
    losses = task_losses(self.model(self.images), self.labels, self.attributes)
    losses.mean(dim=0).sum().backward()
    return None

  def vmap_jacrev(self):
    params = {k: v.detach() for k, v in self.encoder_params.items()}
    jacobian = torch.func.vmap(torch.func.jacrev(self._sample_losses), in_dims=(None, 0, 0, 0))(
      params, self.images, self.labels, self.attributes
    )  # {name: [B, T, *shape]}
    rows = torch.cat(
      [value.reshape(self.batch, len(CASE.TASKS), -1) for value in jacobian.values()], -1
    )
    return _gram(rows, self.batch)

  def vmap_grad_per_task(self):
    params = {k: v.detach() for k, v in self.encoder_params.items()}
    per_task = []
    for task in range(len(CASE.TASKS)):

      def loss(encoder_params, image, label, attribute, task=task):
        return self._sample_losses(encoder_params, image, label, attribute)[task]

      grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(
        params, self.images, self.labels, self.attributes
      )
      per_task.append(torch.cat([value.reshape(self.batch, -1) for value in grads.values()], -1))
    return _gram(torch.stack(per_task, dim=1), self.batch)

  def autograd_loop(self):
    params = list(self.encoder_params.values())
    rows = []
    for index in range(self.batch):
      outputs = self.model(self.images[index : index + 1])
      losses = task_losses(
        outputs, self.labels[index : index + 1], self.attributes[index : index + 1]
      )[0]
      for task in range(len(CASE.TASKS)):
        grads = torch.autograd.grad(losses[task], params, retain_graph=task < len(CASE.TASKS) - 1)
        rows.append(torch.cat([grad.reshape(-1) for grad in grads]))
    return _gram(torch.stack(rows), self.batch)


class OpacusMethod:
  """Opacus's hook-based per-sample gradients (GradSampleModule), one backward per task."""

  def __init__(self, model: TorchModel, methods: TorchMethods):
    from opacus import GradSampleModule  # noqa: PLC0415  (optional beyond torch itself)

    # Its own copy: Opacus hooks the modules it wraps, which would slow the other methods.
    model = copy.deepcopy(model)
    self.module = GradSampleModule(model.encoder, batch_first=True, loss_reduction="sum")
    self.model = model
    self.methods = methods

  def __call__(self):
    methods = self.methods
    per_task = []
    for task in range(len(CASE.TASKS)):
      for parameter in self.module.parameters():
        parameter.grad_sample = None
        parameter.grad = None
      features = self.module(methods.images)
      outputs = {name: head(features) for name, head in self.model.heads.items()}
      task_losses(outputs, methods.labels, methods.attributes)[:, task].sum().backward()
      per_task.append(
        torch.cat([p.grad_sample.reshape(methods.batch, -1) for p in self.module.parameters()], -1)
      )
    return _gram(torch.stack(per_task, dim=1), methods.batch)


def benchmark(encoder: str, batch_size: int, rounds: int, with_loop: bool) -> list[dict]:
  model, params, batch = CASE.make_case(encoder, batch_size)

  def jax_step(with_gramian):
    def run(params, batch):
      result = gramian.loss_grads_and_gramian(
        model, params, {}, batch, CASE.TASKS, path="fast", with_gramian=with_gramian
      )
      return result.loss, result.grads, result.gramian

    return CASE.compiled(run, params, batch)[0]

  jax_plain, jax_fast = jax_step(False), jax_step(True)
  expected = np.asarray(jax_fast(params, batch)[2])
  jax.block_until_ready(jax_plain(params, batch))

  torch_model = TorchModel(encoder, params, CASE.IMAGE_SHAPE)
  methods = TorchMethods(torch_model, batch)
  functions = {
    "JAX plain EW step": lambda: jax.block_until_ready(jax_plain(params, batch)),
    "JAX fast Gramian (+ loss, grads)": lambda: jax.block_until_ready(jax_fast(params, batch)),
    "PyTorch plain EW step": methods.plain_step,
    "torch.func vmap(jacrev)": methods.vmap_jacrev,
    "torch.func vmap(grad) per task": methods.vmap_grad_per_task,
  }
  try:
    functions["Opacus GradSampleModule"] = OpacusMethod(torch_model, methods)
  except ImportError:
    print("[Opacus not installed: its row is skipped (pip install opacus)]", file=sys.stderr)
  if with_loop:
    functions["autograd.grad loop"] = methods.autograd_loop

  differences, cheap = {}, set()
  for name, function in functions.items():
    start = time.perf_counter()
    output = function()  # Warm-up, and the check that every method computes the same Gramian.
    if time.perf_counter() - start < CHEAP_SECONDS:
      cheap.add(name)
    if isinstance(output, torch.Tensor):
      got = output.detach().numpy()
      differences[name] = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
      if differences[name] > MISMATCH:
        print(
          f"[WARNING: {name} disagrees with the JAX fast Gramian by {differences[name]:.1e} "
          "relative: the PyTorch model no longer mirrors the Flax one, or the method is "
          "wrong; its timing compares different computations]",
          file=sys.stderr,
        )
  times = {name: [] for name in functions}
  for _ in range(rounds):
    for name, function in functions.items():
      if name in cheap:
        # Right after a multi-GB method, a short call measured up to 7x slower (allocator and
        # cache effects); one untimed call first gives every short method the same footing.
        function()
      # JAX's and PyTorch's thread pools each spin a while after their work; a pause keeps one
      # framework's idle spinning off the other's timed call.
      time.sleep(PAUSE_SECONDS)
      start = time.perf_counter()
      function()
      times[name].append(time.perf_counter() - start)
  fast_ms = 1e3 * statistics.median(times["JAX fast Gramian (+ loss, grads)"])
  rows = []
  for name in functions:
    median_ms = 1e3 * statistics.median(times[name])
    rows.append(
      dict(
        encoder=encoder,
        batch=batch_size,
        method=name,
        median_ms=median_ms,
        fast_speedup=median_ms / fast_ms,
        difference=differences.get(name),
      )
    )
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=9, help="timed calls of each method")
  parser.add_argument("--batch-sizes", default="64,128", help="comma-separated batch sizes")
  parser.add_argument("--encoders", default="small_cnn,mlp", help="comma-separated: mlp,small_cnn")
  parser.add_argument(
    "--loop-all",
    action="store_true",
    help="time the autograd.grad loop at every batch size, not only the smallest",
  )
  arguments = parser.parse_args()
  # Opacus's hooks on the first layer, whose input needs no gradient: expected, and harmless.
  warnings.filterwarnings("ignore", message="Full backward hook is firing")
  batch_sizes = [int(size) for size in arguments.batch_sizes.split(",")]
  print(
    f"# Fast Gramian vs PyTorch per-sample methods, {datetime.date.today()}, "
    f"{platform.machine()}, {os.cpu_count()} CPU cores (torch threads {torch.get_num_threads()}), "
    f"jax {jax.__version__}, torch {torch.__version__}, T={len(CASE.TASKS)}, "
    f"images {CASE.IMAGE_SHAPE}"
  )
  print()
  print("| encoder | B | method | median ms | ÷ JAX fast | Gramian max rel. diff vs JAX fast |")
  print("|---|---|---|---|---|---|")
  for encoder in arguments.encoders.split(","):
    for batch_size in batch_sizes:
      print(f"[running {encoder} B={batch_size} ...]", file=sys.stderr, flush=True)
      with_loop = arguments.loop_all or batch_size == min(batch_sizes)
      for row in benchmark(encoder, batch_size, arguments.rounds, with_loop):
        difference = "–" if row["difference"] is None else f"{row['difference']:.1e}"
        print(
          f"| {row['encoder']} | {row['batch']} | {row['method']} | {row['median_ms']:.1f} | "
          f"{row['fast_speedup']:.2f} | {difference} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
