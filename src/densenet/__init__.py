"""densenet: DenseNet image classification on CIFAR-10, built on PyTorch.

The public API is imported lazily so that ``import densenet`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DenseNet": "densenet.models",
    "create_model": "densenet.registry",
    "list_models": "densenet.registry",
    "model_from_config": "densenet.registry",
    "load_dataset": "densenet.data",
    "load_model": "densenet.weights",
    "save_model": "densenet.weights",
    "predict": "densenet.predict",
    "train": "densenet.trainer",
    "TrainConfig": "densenet.config",
    "evaluate": "densenet.inference",
    "DenseNetError": "densenet.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'densenet' has no attribute {name!r}")
