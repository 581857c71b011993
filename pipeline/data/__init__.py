"""Stage 1, data: raw datasets -> WebDataset shards + manifest -> augmented batches.

readers/ reads each dataset's published layout; shard.py writes the shards and manifest.py
describes them; augment.py and loader.py turn them into training and evaluation batches (gpu.py
decodes and augments JPEG batches on a GPU). Imports only danet/ and the shared leaves.
"""
