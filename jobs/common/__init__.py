"""Shared by every stage: configs, run directories and manifests, model references, Ray connection."""
