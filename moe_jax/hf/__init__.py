"""Hugging Face checkpoints in and out (convert.py), with their tokenizers."""
