"""Every host read of a device array above the sampler goes through `parallel.host_get`.

`np.asarray(x)` (or `np.array`, `jax.device_get`, `.item()`, `.tolist()`) on an array that spans
other processes' devices crashes a multi-process run (tests/test_multiprocess.py runs the
trainers that way). This lint keeps those calls out of the modules that handle sharded arrays:
they are allowed on visibly host data (a list or comprehension written in place) or on a line
that says why its argument is host data (`# host: ...`).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlhf_jax"
MODULES = sorted([*PACKAGE.glob("train/*.py"), *PACKAGE.glob("eval/*.py"),
                  PACKAGE / "rollout.py", PACKAGE / "feedback.py", PACKAGE / "pipeline.py"])
HOST_LITERALS = (ast.List, ast.Tuple, ast.ListComp, ast.GeneratorExp, ast.Constant)


def _reads(path: pathlib.Path) -> list[str]:
  source = path.read_text()
  if "import jax" not in source:
    return []  # NumPy-only modules (diagnostics, plots) receive what others read
  lines = source.splitlines()
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
      continue
    func = node.func
    owner = func.value.id if isinstance(func.value, ast.Name) else None
    converts = ((owner == "np" and func.attr in ("asarray", "array"))
                or (owner == "jax" and func.attr == "device_get")
                or (func.attr in ("item", "tolist") and not node.args))
    if not converts:
      continue
    if node.args and isinstance(node.args[0], HOST_LITERALS):
      continue
    context = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
    if "# host:" not in context:
      found.append(f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
  return found


def test_no_direct_host_reads_of_device_arrays():
  found = [read for path in MODULES for read in _reads(path)]
  assert not found, ("read device arrays with parallel.host_get (or mark host data with "
                     "'# host: why'):\n" + "\n".join(found))


def test_the_lint_catches_a_direct_read(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import jax\nimport numpy as np\n\ndef f(batch):\n"
                 "  return [i for i in np.asarray(batch['index'])]\n")
  assert len(_reads(bad)) == 1
  bad.write_text("import jax\nimport numpy as np\nx = np.asarray([1, 2])\n")
  assert not _reads(bad)

