"""Model files: ``model.pt`` (modelfile.py), the references that load one (refs.py), ONNX graphs
(onnxgraph.py, onnxfile.py), released weights (importweights.py) and the served pyfunc
(pyfunc.py). Training writes them; evaluation, the registry and the use side read them. The
MLflow store they live in is pipeline/mlflowstore.py."""
