"""Evaluations of dynamo_sampling (users of the library, never imported by it).

* ``evals.metrics``          — quality metrics and DynaMo's same-quality speed-up (pure functions).
* ``evals.quality_vs_speed`` — quality against speed for ``ar`` / ``dynamo`` / ``speculative``.
* ``evals.perplexity``       — per-head PPL_n, joint PPL_1:n and top-1 accuracy.
* ``evals.assets``           — loading a model, tokenizer and co-occurrence statistics for the scripts.
"""
