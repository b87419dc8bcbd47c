"""Model assets shared by the tokenizer and the worker: where the weights
are, the GGUF vocabulary, the chat template and incremental detokenization."""
