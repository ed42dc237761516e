"""SemSegLoop in the browser: Slicer's slice views and Segment Editor effects (trame-slicer)
with the SemSegLoop panel; all training and prediction run in the engine service process.

Optional: ``pip install semsegloop[web]``. Nothing here is imported by the engine or the
Slicer module; ``semsegloop web`` imports it on demand.
"""
