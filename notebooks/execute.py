"""Re-executes every notebook here in place, so the committed files carry their outputs (plots
included) for a reader who runs nothing:

    python notebooks/execute.py            # all notebooks
    python notebooks/execute.py loss_variants.ipynb

The tests (tests/test_notebooks.py) execute the same notebooks from scratch.
"""

import pathlib
import sys
import tempfile

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent


def execute(path: pathlib.Path) -> None:
  notebook = nbformat.read(path, as_version=4)
  with tempfile.TemporaryDirectory() as scratch:  # files the cells write stay out of the repo
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": scratch}}).execute()
  nbformat.write(notebook, path)
  print(f"executed {path.name}")


if __name__ == "__main__":
  for name in sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb")):
    execute(HERE / name)
