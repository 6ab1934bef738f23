"""Glue between a transformer and the AdaCache algorithm (`adacache.core`): it only moves tensors.

The algorithm is in `core/`: which generation, CFG branch and step a call is (`core.clock`), whether its blocks
run (`core.decision`), and what a skipped step adds (`core.store`). This package puts it on a model, one job per
module:

- `api`: the public functions (apply_adacache, remove_adacache, reconfigure, get_stats, describe, ...);
- `install`: what goes on the model and how it comes off (the transformer hook, a short adapter handing each call
  to the runtime; the block wrappers; the probe recorder; inferring a spec on the first call);
- `runtime`: one per patched transformer; orchestrates each call over the frozen `layout` (blocks, cached span,
  probe) built once;
- `generation`: per-generation state behind one holder (`Generations`: the step clock, each branch's generation in
  progress, the finished ones' stats);
- `span`: the cached span on one call: what a skipped step returns, what a computed step measures and keeps;
- `batch`: cutting a batch into its videos and putting the outputs back together (pure functions);
- `block_io`: a block's inputs and outputs read and made through its spec.

On a computed step the blocks run; the first block's input, the probe and the last block's output are noted, and
after the last block the stack residual (output - input, per stream) goes to the store if it wants it. On a skipped
step every block passes its input through untouched and the last block returns the first block's input plus the
residual the store produces for this step (the last one, or a forecast).

The decision is plain Python between block calls, which torch.compile does not trace; each block's own forward is
called unchanged, so blocks can be compiled (`block.compile()`, `compile_blocks` for fullgraph), and so can the model
whole (`model.compile()`, `torch.compile(model)`), before or after apply_adacache. AdaCache's wrappers sit beneath
offloaders' hooks (accelerate's, diffusers' group offloading), which come and go (see `install`). State lives on the model (`model._adacache`),
keyed by CFG branch and reset per generation; nothing is global, no class is patched.

Several videos in one call each get their own schedule and store (the two CFG halves of a video batched in one call
share one). On a step where some compute and others skip, the transformer's forward is called twice, with its
arguments cut to the computing rows and then to the rest, and the two outputs are put back in row order. The cut is
at the transformer's arguments, not at each block's: whatever the model does between its blocks then sees one
consistent sub-batch (Latte reshapes its tokens by a batch size read before its block loop).

A patched model serves one generation at a time (see `runtime.Runtime`) and cannot be deep-copied or pickled (its
hooks are bound to this instance): `remove_adacache` first, then copy. Under diffusers' context parallelism
(`enable_parallelism` after `apply_adacache`) each rank holds a slice of the tokens; `adacache.parallel` makes every
rank decide from the sums of the whole probe. diffusers counts AdaCache as the model's enabled cache while it is
applied, so `enable_cache` cannot stack one of its caches on it. Private diffusers names are used only through
`adacache.compat`.
"""

from .api import (
    apply_adacache,
    cache_context,
    compile_blocks,
    describe,
    get_stats,
    is_applied,
    reconfigure,
    remove_adacache,
    reset_state,
    transformers_of,
)
from .generation import GenerationStats
from .install import runtime_of

__all__ = [
    "GenerationStats", "apply_adacache", "cache_context", "compile_blocks", "describe", "get_stats", "is_applied",
    "reconfigure", "remove_adacache", "reset_state", "runtime_of", "transformers_of",
]
