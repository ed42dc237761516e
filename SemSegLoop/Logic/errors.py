"""Errors the engine raises. Every message names the file, image, node or setting at fault,
so a person reading it in Slicer's error dialog or a CLI line knows what to fix."""


class SemSegLoopError(Exception):
    """Base class: anything the user can fix by changing their input or settings."""


class ProjectError(SemSegLoopError):
    """The project folder or project.json is missing, damaged or of a newer format."""


class ImageReadError(SemSegLoopError):
    """An image file is unsupported, unreadable, or its pixels are unusable (NaN/Inf)."""


class LabelError(SemSegLoopError):
    """Labels do not fit their image (shape, geometry, class values) or are too few to train."""


class CheckpointError(SemSegLoopError):
    """A model checkpoint is missing, damaged or does not fit the project."""


class TrainingError(SemSegLoopError):
    """Training cannot start or continue with the given settings."""
