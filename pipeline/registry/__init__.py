"""The release side: ``danet register`` (the champion gate, pipeline/scores.py) logs the served
model (pipeline/artifacts/pyfunc.py) into its training run and registers it; ``danet summary``."""
