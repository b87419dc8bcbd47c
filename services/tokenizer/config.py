"""Tokenizer service settings (prefix ``LLMFABRIC_TOKENIZER_``)."""

from __future__ import annotations

import dataclasses

from llmfabric.runtime.config import ConfigError, ServerSettings, setting

PREFIX = "LLMFABRIC_TOKENIZER_"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TokenizerConfig(ServerSettings):
    """Settings of the tokenizer service."""

    context_length: int = setting(2048, help="context window per request (prompt + max_tokens); must match the workers'")
    max_request_bytes: int = setting(1 << 20, help="largest prompt or conversation in UTF-8 bytes")
    default_max_tokens: int = setting(256, help="max_tokens when a request sets none")
    model_name: str = setting("", help="served model name (default: the GGUF's catalog name)")

    def validate(self) -> None:
        if self.context_length < 16:
            raise ConfigError(f"{PREFIX}CONTEXT_LENGTH={self.context_length}: must be at least 16")
        if self.max_request_bytes < 1:
            raise ConfigError(f"{PREFIX}MAX_REQUEST_BYTES={self.max_request_bytes}: must be positive")
        if not 1 <= self.default_max_tokens <= self.context_length:
            raise ConfigError(f"{PREFIX}DEFAULT_MAX_TOKENS={self.default_max_tokens}: must be in 1..context_length")
