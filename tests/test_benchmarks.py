"""The accelerator check's dry run (benchmarks/accelerator_check.sh --dry-run): every section
runs at tiny shapes on the CPU and writes its rows with finite numbers."""

import math
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED_ROWS = [
    ("tests", "collected (dry run: --collect-only)"),
    *[("dpo", f"{ref}: {item}") for ref in ("reference in step", "precomputed reference")
      for item in ("step", "pair-tokens/s", "TFLOP/s", "MFU")],
    *[("sampling", item) for item in (
        "ms per new token (incl. prefill)", "new tokens/s", "bytes per decode step",
        "measured copy bandwidth", "roofline step (measured bandwidth)",
        "roofline step (peak bandwidth)")],
    ("attention", "xla + dense mask, T=64"), ("attention", "xla + dense mask, T=128"),
]


def _rows(text):
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 5 and cells[0] not in ("section", "---"):
      rows[(cells[0], cells[1])] = cells[2:]
  return rows


@pytest.mark.slow
def test_accelerator_check_dry_run_writes_every_row(tmp_path):
  out = tmp_path / "results.md"
  # The suite's persistent compilation cache (conftest.py) makes a rerun mostly cache hits.
  env = dict(os.environ, PYTHON=sys.executable, ACCELERATOR_RESULTS=str(out),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run(["bash", "benchmarks/accelerator_check.sh", "--dry-run"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  assert text.startswith("# Accelerator check (DRY RUN")
  rows = _rows(text)
  assert ("dpo", "ERROR") not in rows and not any(k[1] == "ERROR" for k in rows)
  for key in EXPECTED_ROWS:
    assert key in rows, (key, sorted(rows))
    value = float(rows[key][0])
    assert math.isfinite(value) and value > 0, (key, rows[key])
  assert int(rows[EXPECTED_ROWS[0]][0]) > 50  # both test files were collected
  # The conventions printed are the documented ones (16·N·T with the reference, 12·N·T without).
  assert "16·N·T" in rows[("dpo", "reference in step: pair-tokens/s")][2]
  assert "12·N·T" in rows[("dpo", "precomputed reference: pair-tokens/s")][2]
  # MFU is the achieved TFLOP/s over the (nominal, dry run) peak of 1 TFLOP/s, in percent.
  for ref in ("reference in step", "precomputed reference"):
    tflops = float(rows[("dpo", f"{ref}: TFLOP/s")][0])
    assert float(rows[("dpo", f"{ref}: MFU")][0]) == pytest.approx(100 * tflops, rel=1e-3)
  # On a CPU, cuDNN is reported as unavailable rather than timed.
  assert rows[("attention", "cudnn, T=64")][0] == "unavailable"
