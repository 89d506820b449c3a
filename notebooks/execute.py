"""
Re-run the notebooks top to bottom and save them with their outputs, so that what GitHub renders is what the
code does now. Run it after changing the code or a recipe the notebooks use (~2 minutes on a 2-core CPU):

$ python notebooks/execute.py                            # every notebook
$ python notebooks/execute.py notebooks/03_training_dynamics.ipynb
"""

import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def execute(path, timeout=600):
    """Execute one notebook in place (from notebooks/, as Jupyter would) and write it back with its outputs."""
    nb = nbformat.read(path, as_version=4)
    # record_timing=False: no timestamps in the saved file, so a re-run only changes what really changed
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": HERE}}).execute()
    nbformat.write(nb, path)


if __name__ == "__main__":
    for path in sys.argv[1:] or sorted(glob.glob(os.path.join(HERE, "*.ipynb"))):
        t0 = time.time()
        execute(path)
        print(f"{path}: executed in {time.time() - t0:.0f} s")
