"""Using a model, whatever it came from (pipeline/modelrefs.py): ``danet predict`` (label maps,
benchmark-server formats), ``danet explain`` (attention pictures), ``danet export`` (ONNX/INT8)."""
