"""The DANet pipeline: stages and their I/O (datasets, shards, Ray training, MLflow, DVC).

Imports the model library ``danet``; ``danet`` never imports from here.
"""
