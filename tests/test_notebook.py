"""`examples/quickstart.ipynb` runs from top to bottom with nbclient, in a kernel on this interpreter, and the embedded
model answers its questions."""

import json
import sys

import nbformat
import pytest
from conftest import REPO_ROOT
from nbclient import NotebookClient

NOTEBOOK = REPO_ROOT / "examples" / "quickstart.ipynb"
KERNEL_NAME = "otter-flamingo-test"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec that runs ipykernel on this very interpreter (the project's venv), found first on JUPYTER_PATH:
    nbclient then never picks some other `python3` kernel a machine may have (a user-level one, a system Jupyter
    without our packages). Jupyter's and IPython's state goes to tmp_path, not the home directory."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL_NAME, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model: threads only spin against each other
    return KERNEL_NAME


def outputs(cell) -> str:
    return "".join(
        output.get("text", "") for output in cell.get("outputs", []) if output.get("output_type") == "stream"
    )


def test_quickstart_notebook_runs(kernel_name):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert notebook.metadata.kernelspec.name == "python3"  # what a user's Jupyter opens it with
    client = NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=120,
        startup_timeout=60,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # the notebook's own directory, as Jupyter runs it
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    text = "\n".join(outputs(cell) for cell in code)
    assert "error" not in {output.get("output_type") for cell in code for output in cell.get("outputs", [])}
    assert str(REPO_ROOT / "otter" / "default_model") in text
    # The image, the in-context example and the video are answered correctly.
    for answer in ("answer: red", "answer: circle", "answer: three", "colour: purple", "direction: right"):
        assert answer in text, text
    in_context = next(outputs(cell) for cell in code if "in_context" in cell.source)
    assert in_context.strip().endswith("answer: circle")
    assert "<image>User: What shape is it? GPT:<answer> square<|endofchunk|>" in in_context
