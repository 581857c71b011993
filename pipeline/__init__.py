"""The DANet pipeline: the stages and their I/O, in the order one image travels.

    data/        raw dataset -> shards + manifest -> augmented batches
    artifacts/   the trained model as files and MLflow entries, and how to load either
    training/    shards -> model (Ray Train), and the search over it (Ray Tune)
    evaluation/  a model on a split under a protocol -> metrics and pictures
    registry/    metrics -> the MLflow registry (champion gate); prediction
    cli.py       the ``danet`` command; config.py the params

Shared leaves that every stage may use: config.py, errors.py, logs.py, outputs.py, pictures.py.
Imports point back along this list, never forward, and ``danet`` never imports from here.
"""
