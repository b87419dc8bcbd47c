"""Tokenizer service: validation, chat templating and tokenization."""
