"""Training utilities: stdlib code corpus, tokenizer and data preparation."""
