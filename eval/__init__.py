"""kvpack.eval: RULER-style synthetic tasks, the in-repo reference model and accuracy helpers.

Importing this package is cheap: transformers is only imported when a model is built or loaded.
"""

from kvpack.eval.model import reference_model, reference_model_path

__all__ = ["reference_model", "reference_model_path"]
