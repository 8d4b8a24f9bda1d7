"""Prompt building, CoT formats and granularity, and chain parsing: defined once for every stage."""
