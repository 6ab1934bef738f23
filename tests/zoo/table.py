"""Print the README's model table from the sweep's own inference: python tests/zoo/table.py (from the repo root).

One row per video transformer class of the installed diffusers (introspected), with the spec inferred on its tiny
zoo entry: the block lists in call order, the streams a block returns, where the cached span starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adacache.models import specs  # noqa: E402
from adacache.models.infer import InferenceError, diffusers_video_transformers, infer_spec  # noqa: E402
from zoo import entries  # noqa: E402

PIPELINES = {  # tested end to end through the real pipeline (tests/test_pipelines.py, test_pipeline_families.py)
    "WanTransformer3DModel": "WanPipeline", "LatteTransformer3DModel": "LattePipeline",
    "CogVideoXTransformer3DModel": "CogVideoXPipeline", "HunyuanVideoTransformer3DModel": "HunyuanVideoPipeline",
    "LTXVideoTransformer3DModel": "LTXPipeline", "MochiTransformer3DModel": "MochiPipeline",
    "AllegroTransformer3DModel": "AllegroPipeline",
}


def row(name: str) -> str:
    tiny = entries().get(name)
    if tiny is None or name in specs.UNSUPPORTED:
        return f"| `{name}` | no | no | {specs.UNSUPPORTED.get(name, 'no tiny entry')} | |"
    model = tiny.build()
    try:
        inputs = tiny.inputs(model, batch_size=2)
    except NotImplementedError:
        inputs = tiny.inputs(model, batch_size=1)
    try:
        spec = infer_spec(model, (), inputs, moreg=False)
    except InferenceError as error:
        return f"| `{name}` | no | no | inference failed: {error} | |"
    lists = []
    for block_list in spec.block_lists:
        count = len(model.get_submodule(block_list.attribute))
        streams = "video" if block_list.block.encoder_hidden_states_argument is None else \
            f"video + {block_list.block.encoder_hidden_states_argument}"
        lists.append(f"`{block_list.attribute}` x{count} ({streams})")
    structure = (" interleaved with " if spec.interleave else ", then ").join(lists)
    if spec.cache_start:
        structure += f"; span from block {spec.cache_start}"
    moreg = "no" if name in specs.NO_MOREG else "yes"
    tested = "sweep" + (f"; `{PIPELINES[name]}`" if name in PIPELINES else "")
    if name in specs.MODEL_SPECS:
        tested += "; hand-written spec too"
    note = f" MoReg: {specs.NO_MOREG[name]}." if name in specs.NO_MOREG else ""
    return f"| `{name}` | yes | {moreg} | {structure}.{note} | {tested} |"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("| class | caches | MoReg | structure (inferred on the tiny model) | tested by |")
    print("| --- | --- | --- | --- | --- |")
    for name in diffusers_video_transformers():
        print(row(name))
