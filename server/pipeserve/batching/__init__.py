"""Scheduling requests onto a model's execution slots (one per instance)."""
