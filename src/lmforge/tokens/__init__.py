"""Tokenizers (train, build, load) and token shards (write, read)."""
