"""kvpack: KV-cache compression for LLM inference (KVCompose eviction + KVComp lossy encoding)."""

__version__ = "0.1.0"
