"""The embed stage: download shards -> CLIP/T5 embedding shards (stage.py): decode, encode, and the ledger of what is done.
"""
