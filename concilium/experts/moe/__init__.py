"""Sparse mixture kernels for expert replicas: MoE FFN layers and MoE-LoRA adapter mixtures."""
