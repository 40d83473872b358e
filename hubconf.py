"""torch.hub entry points: the models shipped with the package, by name, with their trained weights.

    model = torch.hub.load("path/to/densenet", "densenet-cpu-s-30m", source="local")
    model = torch.hub.load("path/to/densenet", "densenet-cpu-s-30m", source="local", pretrained=False)

Each entry returns the model in eval mode with ``model.meta`` (classes, normalisation, model card);
``pretrained=False`` gives the same architecture freshly initialised. ``torch.hub.list`` lists
them. The package is imported from this checkout's ``src/`` when it is not installed.
"""

# names that torch.hub.list must not show as entry points start with an underscore
import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "safetensors", "numpy"]

try:
    import densenet as _densenet  # noqa: F401
except ImportError:  # a plain checkout: use its sources
    _sys.path.insert(0, str(_Path(__file__).resolve().parent / "src"))

from densenet.pretrained import pretrained_names as _pretrained_names  # noqa: E402
from densenet.registry import model_from_config as _model_from_config  # noqa: E402
from densenet.weights import load_model as _load_model  # noqa: E402


def _entry(name: str):
    def load(pretrained: bool = True, device: str = "cpu"):
        model, meta = _load_model(name, device=device)
        if not pretrained:
            model = _model_from_config(meta["config"]).to(device).eval()
            model.meta = meta
        return model

    load.__name__ = name
    load.__doc__ = f"The shipped model {name!r} (see src/densenet/pretrained/{name}/README.md)."
    return load


for _name in _pretrained_names():
    globals()[_name] = _entry(_name)
