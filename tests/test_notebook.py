"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel on the fast path: a random tiny SDXL
teacher, a 2-step LCM-LoRA run trained by the notebook itself, the LoRA loaded into a diffusers pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _ensure_kernel() -> str:
    """The notebook's kernel, `python3` (this interpreter): install its spec into the venv if missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
                       check=True, capture_output=True)
    return "python3"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert not any("def losses" in c.source or "optimizer" in c.source for c in code), \
        "notebooks import distill; they do not define training code"


# a kernel start, a 2-step training run, an export and 5 sampling runs: about 45 s on a loaded 2-core machine
def test_quickstart_runs_on_the_tiny_random_model(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_NB_TEACHER", "distill:random-sdxl")
    monkeypatch.setenv("DISTILL_NB_STEPS", "2")
    monkeypatch.setenv("DISTILL_NB_OUT", str(tmp_path))
    monkeypatch.delenv("DISTILL_NB_RUN", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=_ensure_kernel(), timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "distill:random-sdxl" in text
    assert "max |LoRA on - LoRA off|" in text
    run_dir = next(ln for ln in text.splitlines() if ln.startswith("run folder:")).split(":", 1)[1].strip()
    info = json.loads((Path(run_dir) / "export" / "export.json").read_text())
    assert info["method"] == "lcd-lora" and info["scheduler"] == "TCDScheduler" and info["eta"] == 0.0
    assert "TCDScheduler  4 steps" in text  # the card's scheduler sampled the student (DDIMScheduler the teacher)
    # 5 columns (LCM-LoRA 1/2/4, teacher 4/25) x 4 prompt rows of 32x32 images upscaled 4x; the grid is shown
    grid = Image.open(tmp_path / "quickstart_grid.png")
    assert grid.width > 5 * 128 and 4 * 128 < grid.height < 5 * 128
    assert any("image/png" in o.get("data", {}) for o in nb.cells[-1].outputs)
