"""The inference service's OpenAI-compatible API (models, chat and text completions),
proxied under the caller's tenant."""
