"""Run by test_context_parallel.py under torchrun: `adacache.cli` with the process whose RANK is FROZEN_RANK frozen
at its third transformer call, as a hung or stopped process is: it sleeps and never joins another collective."""

import os
import sys
import time

import adacache.pipelines
from adacache.cli import main

load_pipeline = adacache.pipelines.load_pipeline


def load_and_freeze(*args, **kwargs):
    pipe = load_pipeline(*args, **kwargs)
    calls = [0]

    def freeze(module, inputs):
        calls[0] += 1
        if calls[0] == 3:
            time.sleep(3600)  # ended by the launcher's SIGTERM once the others stopped

    if os.environ["RANK"] == os.environ["FROZEN_RANK"]:
        pipe.transformer.register_forward_pre_hook(freeze)
    return pipe


adacache.pipelines.load_pipeline = load_and_freeze

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
