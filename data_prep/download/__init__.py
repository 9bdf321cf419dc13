"""The download stage: a URL list -> webdataset shards with img2dataset (stage.py), and its config, list reading, child process, verification and retries.
"""
