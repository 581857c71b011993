"""Stage 4, registry and use: register an evaluated model (``danet register``, the champion gate)
and predict with any model reference (``danet predict``)."""
