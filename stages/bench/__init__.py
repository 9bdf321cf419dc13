"""Benchmarks: a training step's speed and DeepSpeed's cost (train_step.py), the loader's headroom (loader.py), a run's cost before it starts (plan.py).
"""
