"""Evaluation of generated images: prompt accuracy on the synthetic shapes (shapes.py)."""
