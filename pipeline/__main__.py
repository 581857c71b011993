"""``python -m pipeline <command>``: the ``danet`` command without the installed script (e.g. as a
Ray job's entrypoint: ``ray job submit --working-dir . -- python -m pipeline train``)."""

from pipeline.cli import app

app()
