"""``t2i export``: a trained model as a folder that stands alone.
"""
