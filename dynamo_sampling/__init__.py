"""dynamo_sampling: several tokens per forward pass from multi-token-prediction models.

Layers (dependencies point down; inference never imports ``train``): ``models`` (TinyMTP with its
checkpoint I/O, the Hugging Face adapter), ``cooccurrence`` (corpus statistics), ``tokenizer`` and
``corpus`` (loading the tokenizer, listing the stdlib) at the bottom; ``samplers`` and ``policy``
(the DynaMo step, with the CUDA ``kernels`` beside it) and ``lookup`` (the prompt-lookup index)
above them; ``decoding`` (one loop, four strategies) on top of those; ``sampling.sample`` (the
public entry, validation), ``text.generate_text`` (strings in, strings out) and ``pretrained``
(the bundled model) above it. ``cli``, ``demo``, ``train`` and ``evals`` use the library and are
never imported by it (only ``cli`` imports ``train``, for its ``train`` command).
"""
__version__ = "0.2.0"

from .cooccurrence import CooccurrenceStats
from .decoding import STRATEGIES, GenerationOutput
from .drafting import DraftConfig
from .lookup import LookupConfig
from .models import KVCache, TinyMTP, TinyMTPConfig
from .policy import DynamoConfig, StepOutput, dynamo_step
from .pretrained import load_pretrained
from .samplers import SamplingParams
from .sampling import sample
from .text import generate_text

__all__ = ["CooccurrenceStats", "DraftConfig", "DynamoConfig", "GenerationOutput", "KVCache", "LookupConfig",
           "STRATEGIES", "SamplingParams", "StepOutput", "TinyMTP", "TinyMTPConfig", "__version__", "dynamo_step",
           "generate_text", "load_pretrained", "sample"]
