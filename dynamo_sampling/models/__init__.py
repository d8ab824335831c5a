"""MTP models behind one protocol (see ``tiny.py``); ``hf`` adapters need the ``hf`` extra."""
from .cache import FeedPlan, KVCache
from .tiny import TinyMTP, TinyMTPConfig

__all__ = ["FeedPlan", "KVCache", "TinyMTP", "TinyMTPConfig"]
