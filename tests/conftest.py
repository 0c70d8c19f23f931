"""Test-wide setup. XLA_FLAGS must be set before jax is first imported, so it lives here."""

import os

# 8 fake CPU devices for the mesh tests. The suite is compile-bound (tiny models, a few steps,
# hundreds of programs): LLVM at -O0 compiles about 30% faster and the programs still run in
# milliseconds. Every comparison in a test runs both sides under the same flags; subprocesses
# (CLI, notebooks, multi-process jobs) inherit them. A flag already in XLA_FLAGS wins.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from a hub at test time
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import tempfile  # noqa: E402

import jax  # noqa: E402

# 8 fake CPU devices share 2 cores: two sharded programs in flight at once can each hold threads
# in their all-reduce rendezvous and deadlock (XLA aborts after 40 s). Synchronous CPU dispatch
# runs one program at a time. (Real accelerators have no such limit.)
jax.config.update("jax_cpu_enable_async_dispatch", False)

# Trainers rebuilt from the same config (resume tests, sharded-vs-single) compile identical
# programs: the persistent cache makes the second and later builds cheap.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("RLHF_JAX_TEST_XLA_CACHE",
                                 os.path.join(tempfile.gettempdir(), "rlhf_jax_xla_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# An accidental broadcast ([B] against [B, 1]) is an error, not a silently wrong loss.
jax.config.update("jax_numpy_rank_promotion", "raise")

# The longest files first: pytest-xdist's `--dist loadfile` hands whole files to the workers in
# collection order, so a long file collected last would end the run on one worker alone.
_LONGEST_FIRST = ("tests/train/test_online.py", "tests/test_multiprocess.py",
                  "tests/test_pipeline.py", "tests/test_verifiable.py",
                  "tests/train/test_trainers.py", "tests/test_feedback.py",
                  "tests/models/test_hf_io.py", "tests/test_notebooks.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return _LONGEST_FIRST.index(path) if path in _LONGEST_FIRST else len(_LONGEST_FIRST)
  items.sort(key=rank)  # stable: the order within a file is kept
