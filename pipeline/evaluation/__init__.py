"""Stage 3, evaluation: a model on a split of the shards under a protocol (``danet evaluate``).

The protocols themselves (whole image, sliding window, multi-scale, flip) are pure torch in
danet/inference.py, shared with prediction and serving.
"""
