"""What knows Slicer: the MRML bridge (segments <-> label maps), the panel's wording and
decisions, the engine process it runs, plots and predictions in the scene, installs."""
