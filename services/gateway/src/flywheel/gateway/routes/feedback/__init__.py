"""Feedback on generations: record, edit, retract, read, list, stats, export."""
