"""Heads on stored features: the keyed, checksummed feature store (store.py) and the embedding that fills it
(embedder.py, the `embed` stage's work)."""
