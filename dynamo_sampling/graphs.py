"""The decoding loop's model forward replayed from a CUDA graph.

On a GPU a small model's decode step is bound by kernel launches (the bundled 8.4 M-parameter model
takes ~4 ms a step on an H100 whatever the batch: ~100 launches from Python). With the static feed
width of the loop (:attr:`KVCache.static`, the default on an accelerator) a step's forward has the
same shapes every time and no host sync, so it can be captured once and replayed:
:class:`GraphedForward` copies each call's ``input_ids`` and ``positions`` into the captured input
buffers, replays, and returns the graph's own output tensors (valid until the next call with the
same shapes, which is how the loop uses them). The KV cache is the loop's, written in place by the
replay at the positions given. One capture per distinct (shapes, keyword arguments).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch


def cuda_capture(fn: Callable[[], object], device: torch.device) -> Tuple[Callable[[], None], object]:
    """(replay, outputs): ``fn`` run once for warm-up on a side stream (as ``torch.cuda.graph``
    requires), then captured; ``replay()`` reruns the captured work and refreshes ``outputs`` in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def eager_capture(fn: Callable[[], object], device: torch.device) -> Tuple[Callable[[], None], object]:
    """The same contract without a GPU (tests): ``replay()`` reruns ``fn`` and copies its results into
    the first call's output tensors, so callers see exactly the static-buffer semantics of a graph."""
    out = fn()

    def replay():
        new = fn()
        for o, n in zip(_flat(out), _flat(new)):
            o.copy_(n)

    return replay, out


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


class GraphedForward:
    """``model(input_ids, positions, cache, **kwargs)`` replayed from one captured graph per
    (shapes, kwargs); ``capture`` is :func:`cuda_capture` (default) or :func:`eager_capture`."""

    def __init__(self, model, cache, capture=cuda_capture):
        self.model, self.cache, self.capture = model, cache, capture
        self.graphs = {}

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, **kwargs):
        key = (tuple(input_ids.shape), tuple(sorted(kwargs.items())))  # positions: same shape
        entry = self.graphs.get(key)
        if entry is None:
            ids, pos = input_ids.clone(), positions.clone()
            replay, out = self.capture(lambda: self.model(ids, pos, self.cache, **kwargs), input_ids.device)
            self.graphs[key] = (replay, ids, pos, out)
            replay()  # the capture itself computes nothing on a GPU
            return out
        replay, ids, pos, out = entry
        ids.copy_(input_ids)
        pos.copy_(positions)
        replay()
        return out
