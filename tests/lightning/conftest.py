import os
import sys

import torch

# The networks here are tiny: one thread avoids OpenMP spin-waiting on a shared 2-core machine (100x faster under
# load), and subprocesses inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
