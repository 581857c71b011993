"""Stage 2, training: shards -> a trained model (``danet train``) or a searched one (``danet tune``).

loop.py is the recipe in plain torch; worker.py runs it on every Ray Train rank with checkpoints
(checkpoint.py); driver.py checks the job (job.py), fits it and writes the outputs (results.py);
search.py runs Ray Tune trials of the same job.
"""
