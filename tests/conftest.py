"""Shared test set-up.

* Under pytest-xdist (``make test`` runs one worker per core) each worker keeps torch on one intra-op
  thread, so workers never oversubscribe the cores (README, "Threads": a small model on two threads
  while another process busies a core decodes many times slower).
* Garbage collection, for speed only: the youngest generation is collected every 50 000 net
  allocations instead of every 700, and once collection is done (torch, transformers, hypothesis and
  every test module imported) the ~4 * 10^5 objects alive then are moved out of the cyclic
  collector's reach (``gc.freeze``; a few thousand import-time garbage objects stay with them).
  Otherwise every full collection re-scans all of them, and tests that build many small Python
  objects (the lookup index of 80 000 sampled rows, hypothesis) spent about half their time there;
  collecting the tests gets ~1.4 s faster too. Only *when* the cyclic collector runs changes:
  reference counting still frees everything at once, and every test does the same work and asserts
  the same things.
"""
import gc
import os

gc.set_threshold(50_000, 20, 10)  # CPython's default is (700, 10, 10); set before the imports below

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_finish(session):
    gc.freeze()
