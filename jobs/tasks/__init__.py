"""Problem sources (reasoning-gym, files, HF datasets) and answer verifiers."""
