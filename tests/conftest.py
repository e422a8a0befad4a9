"""Suite-wide settings.

One intra-op thread per test process: the suite runs as 2 xdist workers on 2 cores, and
OpenMP/MKL threads spinning for a core another worker holds made a 1376 x 512 SVD take 25 s
instead of 1 s on a busy machine (measured here). Subprocesses inherit OMP_NUM_THREADS=1 from
scripts/test.sh.
"""

import torch

torch.set_num_threads(1)
