"""CI: the light install (pip install adacache, no extra) caches a model, and the command line says what to add.

Run by .ci/run in a virtual environment holding torch and `pip install .` only.
"""

import importlib.util
import subprocess
import sys

import torch

import adacache
from adacache.testing import tiny_model

for module in ("imageio", "matplotlib", "accelerate", "gradio"):  # (tqdm comes with huggingface-hub)
    assert importlib.util.find_spec(module) is None, f"{module} came with the light install"

tiny = tiny_model("wan")
model = tiny.build()
plain = [model(**tiny.inputs(model, timestep=t))[0] for t in (900.0, 500.0, 100.0)]
adacache.apply_adacache(model, adacache.AdaCacheConfig(codebook={1.0: 1}, num_inference_steps=3))
cached = [model(**tiny.inputs(model, timestep=t))[0] for t in (900.0, 500.0, 100.0)]
adacache.remove_adacache(model)
assert all(torch.equal(a, b) for a, b in zip(plain, cached)), "rate 1 is not bit-identical"

run = subprocess.run([sys.executable, "-m", "adacache.cli", "generate", "a red circle moving left", "-o", "x.mp4"],
                     capture_output=True, text=True)
assert run.returncode == 2 and 'pip install "adacache[all]"' in run.stderr, (run.returncode, run.stderr)
print("core-only install: apply_adacache works; the CLI says:", run.stderr.strip())
