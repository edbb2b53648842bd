"""Data stage: sources (MP live, snapshots), structure libraries, validation with rejects, splits."""
