"""Benchmarks of the data stages against the tools they wrap: img2dataset (download.py) and the encoders (embed.py).
"""
