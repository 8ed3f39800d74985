"""End-to-end LLM workflows: ingest -> LoRA SFT (LLaMA-Factory on Ray Train) -> evaluate (vLLM on Ray Data) -> serve (Ray Serve LLM)."""

__version__ = "0.1.0"
