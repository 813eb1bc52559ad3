"""tsugiki: one base language model, many hot-swappable LoRA adapters, behind an OpenAI-compatible Ray Serve API."""

__version__ = "0.1.0"
