"""The ``simmim`` command line: one thin function per command over the library (``commands/``).

``app.py`` holds the Typer app and its error handling; ``training.py``, ``tools.py`` and ``embeddings.py`` declare
the commands, which ``simmim --help`` lists in the order they register here.
"""

# isort: off
from . import training  # noqa: F401  (make-shards, pretrain, finetune, linear-probe)
from . import tools  # noqa: F401  (evaluate, visualize-recon, knn, export, predict)
from . import embeddings  # noqa: F401  (embed, search)
from . import check  # noqa: F401  (check pretrain | finetune | linear-probe)
# isort: on
from .app import app, run

__all__ = ["app", "run"]
