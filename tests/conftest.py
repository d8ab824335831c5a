"""Shared test set-up: under pytest-xdist (``make test`` runs one worker per core) each worker keeps
torch on one intra-op thread, so workers never oversubscribe the cores (README, "Threads": a small
model on two threads while another process busies a core decodes many times slower)."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
