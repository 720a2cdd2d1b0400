"""Capture: hooks that watch a training loop and produce step packets."""
