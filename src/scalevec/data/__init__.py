"""Training data: bundled corpus, tokenizer, token shards, resumable loader."""
