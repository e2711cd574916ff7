"""Generations: the model outputs feedback attaches to."""
