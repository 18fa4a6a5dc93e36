"""flywheel package."""
