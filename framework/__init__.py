"""layerprobe: evaluate sentence embeddings layer by layer.

The harness lives here (hook specs, plugin registry, the evaluation flow, MLflow tracking);
the things it evaluates with (encoders, poolers, datasets, metrics) are plugins.
"""

__version__ = "0.1.0"
