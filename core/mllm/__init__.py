"""Multimodal LLM support: nano models, torchvision-free processors, the chat template, message
conversion and class-token scoring. Heavy imports (torch, transformers) happen inside functions."""
