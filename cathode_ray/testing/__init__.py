"""Test helpers that run for real here: a local Materials-Project-shaped HTTP server."""
