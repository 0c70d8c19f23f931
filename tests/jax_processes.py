"""Launches real multi-process JAX jobs on 127.0.0.1, as a user would, for the tests.

`launch(commands, num_processes=2, devices_per_process=4)` starts `num_processes` Python
processes, each with `devices_per_process` fake CPU devices and the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, and runs each command (the arguments of
`python -m rlhf_jax`, e.g. ["run", "experiments/sft.py", "--set", ...]) through the CLI's
`main`, one after another in the same processes (several trainers share one start-up). CPU
collectives between the processes go through gloo. One process with 8 devices is the reference.

Run as a script, it is the body of one process: `python tests/jax_processes.py COMMANDS_JSON`.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def start(commands: list[list[str]], *, num_processes: int = 2, devices_per_process: int = 4,
          log_dir: pathlib.Path, env: dict | None = None) -> list[subprocess.Popen]:
  """Starts the processes of one job; returns them (see `wait`)."""
  port = _free_port()
  log_dir.mkdir(parents=True, exist_ok=True)
  processes = []
  for rank in range(num_processes):
    # The test session's other XLA flags carry over; the device count is this job's.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    # (tests/conftest.py's LLVM -O0 among them: these jobs are compile-bound, and both sides of
    # every comparison run with the same flags.)
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    process_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1",
                   "XLA_FLAGS": " ".join(flags)}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
      process_env.pop(name, None)
    if num_processes > 1:
      process_env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                         JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(rank))
    log = open(log_dir / f"process-{rank}.log", "w")  # noqa: SIM115 — closed with the process
    processes.append(subprocess.Popen(
        [sys.executable, __file__, json.dumps(commands)], cwd=ROOT, env=process_env,
        stdout=log, stderr=subprocess.STDOUT))
  return processes


def wait(processes: list[subprocess.Popen], log_dir: pathlib.Path, timeout: float = 600):
  """Waits for every process; on a failure or a timeout, kills the rest and raises with the
  logs' tails."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in processes):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in processes):
        break
      time.sleep(0.2)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  codes = [p.returncode for p in processes]
  if any(codes):
    tails = "\n".join(f"--- process {i} (exit {code}):\n"
                      + (log_dir / f"process-{i}.log").read_text()[-3000:]
                      for i, code in enumerate(codes))
    raise RuntimeError(f"multi-process job failed or timed out: exit codes {codes}\n{tails}")


def launch(commands, *, num_processes=2, devices_per_process=4, log_dir=None, timeout=600):
  log_dir = pathlib.Path(log_dir or tempfile.mkdtemp())
  wait(start(commands, num_processes=num_processes, devices_per_process=devices_per_process,
             log_dir=log_dir), log_dir, timeout)


def _main(commands_json: str) -> int:
  import jax

  # 8 fake devices on 2 cores: one program in flight at a time (see tests/conftest.py).
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("RLHF_JAX_TEST_XLA_CACHE",
                                   os.path.join(tempfile.gettempdir(), "rlhf_jax_xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  from rlhf_jax import cli

  for argv in json.loads(commands_json):
    code = cli.main(argv)
    if code:
      return code
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1]))
