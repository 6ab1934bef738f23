import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import their toy models as `toy`
# One thread: the machines are 2-core and shared; two threads make tiny models' timings (and test time) erratic.
torch.set_num_threads(1)
