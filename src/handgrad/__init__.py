"""handgrad: neural language models trained with hand-written backward passes.

What a user of the Python API needs is importable from here (docs/python.md shows it in use):
the layer contract (`Module`) and the layers, `Sequential`, the model (`Model`, `ModelConfig`,
`build_model`), the losses, the checks, the optimizers, the data, and `fit`, the training
function `handgrad train` itself calls. They load on first use, so that `import handgrad` (and the
command line's start) stays quick.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "layers": ("Module", "Embedding", "Flatten", "FlattenConsecutive", "Linear", "TiedLinear", "Tanh", "BatchNorm1d",
               "BatchNorm1dStepwise", "Sequential", "Residual"),
    "loss": ("CrossEntropy", "CrossEntropyStepwise"),
    "model": ("Model", "ModelConfig", "build_model"),
    "gradcheck": ("check_layer", "check_model", "finite_difference_check", "format_table", "passed"),
    "optim": ("SGD", "AdamW", "make_optimizer", "learning_rate"),
    "data": ("Dataset", "Vocab", "make_dataset"),
    "train": ("TrainConfig", "fit", "evaluate"),  # not `train`: the name of the module itself
    "checkpoint": ("load_model",),
    "sample": ("generate",),
    "errors": ("HandgradError",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'handgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
