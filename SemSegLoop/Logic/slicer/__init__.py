"""What knows Slicer: the MRML bridge (segments <-> label maps), the panel's wording and
decisions, the background worker and dependency installation."""
