"""Serving: base model loading, multi-LoRA layers, the batching engine, the OpenAI API and the Ray Serve shell."""
