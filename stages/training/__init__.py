"""The training machinery: the one loop (trainer.py) and its components — config, loader, checkpoints, EMA, optimizer, DeepSpeed engine, metrics, validation, final weights, FLOPs.
"""
