"""Check tiny zoo entries: python tests/zoo/check_entry.py CLASS_NAME [CLASS_NAME ...]  (run from the repo root).

For each entry: it builds, a forward runs at batch 1 and 2, output[0] has the latent's shape (or is a tensor),
two calls agree exactly, another timestep changes the output, sample 0 of a batch of 2 matches batch 1, and every
block of every list in `block_lists` is called once per forward and changes its hidden states (a block that is the
identity would make cache tests pass trivially: fill its zero-initialised gates through `randomize`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo import entries  # noqa: E402


def first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    return None


def check(name: str) -> list[str]:
    tiny = entries()[name]
    problems = []
    start = time.perf_counter()
    model = tiny.build(seed=0)
    params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - start
    calls: dict[str, int] = {}
    changed: dict[str, bool] = {}
    handles = []
    for attribute in tiny.block_lists:
        blocks = model.get_submodule(attribute)
        for i, block in enumerate(blocks):
            key = f"{attribute}.{i}"

            def hook(module, args, kwargs, output, key=key):
                calls[key] = calls.get(key, 0) + 1
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                out = first_tensor(output)
                if isinstance(hidden, torch.Tensor) and out is not None and out.shape == hidden.shape:
                    changed[key] = not torch.allclose(out, hidden)
                else:
                    changed[key] = True  # cannot compare: assume it works

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        start = time.perf_counter()
        out1 = first_tensor(model(**tiny.inputs(model, batch_size=1, timestep=500.0, seed=0)))
        forward_s = time.perf_counter() - start
        for h in handles:
            h.remove()
        again = first_tensor(model(**tiny.inputs(model, batch_size=1, timestep=500.0, seed=0)))
        other_t = first_tensor(model(**tiny.inputs(model, batch_size=1, timestep=200.0, seed=0)))
        out2 = first_tensor(model(**tiny.inputs(model, batch_size=2, timestep=500.0, seed=0)))
    if out1 is None:
        return [f"{name}: the output holds no tensor"]
    if not torch.equal(out1, again):
        problems.append("two identical calls differ")
    if torch.allclose(out1, other_t):
        problems.append("the timestep does not change the output")
    if out2 is None or out2.shape[0] != 2 * out1.shape[0] and out2.shape[0] != 2:
        problems.append(f"batch 2 output shape {None if out2 is None else tuple(out2.shape)}")
    elif not torch.allclose(out2[:1], out1, atol=1e-4, rtol=1e-3):
        problems.append("sample 0 of a batch of 2 differs from the batch of 1 (inputs must depend on (seed, i) only)")
    for attribute in tiny.block_lists:
        n = len(model.get_submodule(attribute))
        for i in range(n):
            key = f"{attribute}.{i}"
            if calls.get(key, 0) != 1:
                problems.append(f"{key} called {calls.get(key, 0)} times in one forward")
            elif not changed.get(key, True):
                problems.append(f"{key} returns its input unchanged (zero-initialised gates? use randomize)")
    if params > 5_000_000:
        problems.append(f"{params} parameters (keep it under 5M)")
    if forward_s > 1.0:
        problems.append(f"forward took {forward_s:.2f} s (keep it under 1 s)")
    print(f"{name}: {params} params, build {build_s:.2f} s, forward {forward_s * 1000:.0f} ms, output "
          f"{tuple(out1.shape)}: {'OK' if not problems else '; '.join(problems)}")
    return problems


if __name__ == "__main__":
    torch.set_num_threads(1)
    failed = [n for n in sys.argv[1:] if check(n)]
    sys.exit(1 if failed else 0)
