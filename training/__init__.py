"""Offline training of SAEs, end-to-end SAEs and codebook models."""
