"""MTP models behind one protocol (see ``tiny.py``); ``hf`` adapters need the ``hf`` extra."""
from .tiny import KVCache, TinyMTP, TinyMTPConfig

__all__ = ["KVCache", "TinyMTP", "TinyMTPConfig"]
