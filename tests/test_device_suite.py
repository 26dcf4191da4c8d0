"""Tests of benchmarks/device_suite.sh: its CPU-sized run (--smoke) goes through every part and
writes each table; a full run refuses a machine without an accelerator."""

import os
import re
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_suite.sh")
PARTS = ("paper_scale", "gramian", "methods", "sweep", "bf16_check")


def _run(*arguments):
  environment = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
  environment["PYTHON"] = sys.executable
  return subprocess.run(
    ["bash", SCRIPT, *arguments], cwd=ROOT, capture_output=True, text=True, env=environment
  )


def test_smoke_runs_every_part_and_writes_its_table(tmp_path):
  result = _run(str(tmp_path), "--smoke", "--wheels", "none")
  summary = (tmp_path / "summary.md").read_text()
  assert result.returncode == 0, summary + result.stderr[-3000:]
  for part in PARTS:
    assert re.search(rf"^\| {part} \| 0 \| \d+ \|$", summary, re.M), (part, summary)
  paper_scale = (tmp_path / "paper_scale.md").read_text()
  assert "host ÷ step (device aug)" in paper_scale
  row = next(line for line in paper_scale.splitlines() if line.startswith("| cityscapes_segnet |"))
  cells = [cell.strip() for cell in row.strip("|").split("|")]
  # Every figure measured: the two host ÷ step ratios are numbers, not 'n/a'.
  assert all(re.fullmatch(r"\d+\.\d\d", cell) for cell in cells[-2:]), row
  # What the backward pass keeps: a bfloat16 model keeps less than a float32 one.
  header = next(line for line in paper_scale.splitlines() if line.startswith("| config |"))
  header = [cell.strip() for cell in header.strip("|").split("|")]
  assert 0 < float(cells[header.index("saved bf16 ÷ f32")]) < 1, row
  assert "Main job (configs/reproduce.py" in paper_scale
  assert re.search(r"\| mlp \| 4 \| \d\.\d\de-\d\d \|", (tmp_path / "gramian.md").read_text())
  assert "| EW |" in (tmp_path / "methods.md").read_text()


def test_full_run_needs_an_accelerator_and_an_outdir(tmp_path):
  missing = _run()
  assert missing.returncode == 2 and "usage:" in missing.stderr
  if jax.default_backend() != "cpu":
    pytest.skip("an accelerator is present: a full run would start")
  refused = _run(str(tmp_path / "out"), "--wheels", "none")
  assert refused.returncode == 2
  assert "error: jax sees no accelerator" in refused.stderr
