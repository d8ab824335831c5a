"""dynamo_sampling: several tokens per forward pass from multi-token-prediction models.

Layers (each only calls the one below): ``models`` -> ``cooccurrence`` -> ``policy`` (the DynaMo
step) -> ``decoding`` (one loop, three strategies) -> ``sampling.sample`` (the public entry).
"""
from .decoding import GenerationOutput
from .models import KVCache, TinyMTP, TinyMTPConfig
from .policy import DynamoConfig, StepOutput, dynamo_step
from .pretrained import load_pretrained
from .sampling import sample

__all__ = ["DynamoConfig", "GenerationOutput", "KVCache", "StepOutput", "TinyMTP", "TinyMTPConfig",
           "dynamo_step", "load_pretrained", "sample"]
