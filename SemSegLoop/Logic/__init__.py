"""SemSegLoop engine: sparse painted labels -> UNet training -> predictions, headless.

Imported as ``semsegloop`` everywhere (pip install, CLI, tests, and inside Slicer through the
module's own loader). Importing it is cheap: torch and MONAI load only when training or predicting.
"""

from semsegloop.errors import (CheckpointError, ImageReadError, LabelError, ProjectError,
                     SemSegLoopError, TrainingError)

__version__ = "0.1.0"

__all__ = ["Project", "SemSegLoopError", "ProjectError", "ImageReadError", "LabelError",
           "CheckpointError", "TrainingError", "__version__"]


def __getattr__(name):
    # Project pulls in SimpleITK; keep `import semsegloop` light for Slicer's module scan.
    if name == "Project":
        from semsegloop.project import Project
        return Project
    raise AttributeError(f"module 'semsegloop' has no attribute {name!r}")
