"""densenet: DenseNet image classification on CIFAR-10, built on PyTorch.

The public API is imported lazily so that ``import densenet`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DenseNet": "densenet.models",
    "create_model": "densenet.models",
    "list_models": "densenet.models",
    "model_from_config": "densenet.models",
    "load_dataset": "densenet.data",
    "load_model": "densenet.weights",
    "save_model": "densenet.weights",
    "predict": "densenet.predict",
    "train": "densenet.train",
    "TrainConfig": "densenet.train",
    "evaluate": "densenet.evaluate",
    "DenseNetError": "densenet.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'densenet' has no attribute {name!r}")
