"""Checkpoint readers and the loader that maps checkpoint tensors onto model parameters."""
