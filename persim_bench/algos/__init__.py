"""Algorithms: each file holds only what is specific to one method (model, training)."""
