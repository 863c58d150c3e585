"""The embedding pack: domain embedding experts (LoRA on all-MiniLM-L6-v2), routed by pilots.

``corpus``    (query, document) pairs from the docstrings of installed packages, per domain
``splits``    per-domain held-out retrieval set / training pairs
``pilots``    pilot queries chosen among training queries (k-means medoids)
``train``     contrastive LoRA training (symmetric InfoNCE, in-batch negatives)
``build``     ``python -m concilium.embedpack.build --out embed_pack [--quick]``
``manifest``  manifest.json / retrieval.jsonl
``install``   ``install_embed_pack(registry, pack_dir)``: register base + adapters, idempotent
``metrics``   nDCG@k and dense top-k
"""

from concilium.embedpack.install import install_embed_pack

__all__ = ["install_embed_pack"]
