"""Preference optimisation of the multimodal models (MMedPO-style pairs and weighted DPO)."""
