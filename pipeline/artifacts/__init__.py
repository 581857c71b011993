"""The trained model as artifacts: ``model.pt``, MLflow runs and logged models, model references.

Training writes them; evaluation, the registry and prediction read them. Below the stages that
use it: imports only danet/ and the shared leaves.
"""
