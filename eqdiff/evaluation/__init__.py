"""Scores (CLIP-I, CLIP-T, DINO), score tables and the report."""
