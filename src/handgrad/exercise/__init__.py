"""The learners' exercise: derive every gradient of the MLP by hand, and have handgrad find the first wrong
one and say why (docs/exercise.md).

- `levels`: each level's forward, its gradients in backward order, where each tensor flows, the answers;
- `notebook`: the files (`.py` with `# %%` cells, and `.ipynb`), written and read back;
- `runtime`: what an exercise file imports (the fixed batch, the seed's initialisation, the batches);
- `sandbox`: the learner's code in a fresh namespace, its errors in one line, a time limit;
- `diagnosis`: one gradient judged, and the kind of mistake named;
- `checker`: `handgrad exercise check`; `training`: `handgrad exercise train`;
- `commands`: what the three subcommands print.
"""
from .levels import LEVEL_CHOICES, VERSIONS

__all__ = ["LEVEL_CHOICES", "VERSIONS"]
