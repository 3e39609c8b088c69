"""Inference runtime: partial models (layer shards) on llama.cpp and ONNX Runtime.

Start at ``engine.py`` (the interface), then ``shards.py`` (how a layer range becomes a
GGUF of its own) and ``llamacpp.py`` (how llama.cpp runs it).
"""
