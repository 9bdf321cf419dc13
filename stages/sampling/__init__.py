"""Sampling: whole cascades from a run's trained models (cascade.py), what they load, how they are guided and reranked, and what a sampling run leaves behind.
"""
