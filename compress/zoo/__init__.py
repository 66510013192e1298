"""Benchmark zoo: models built from the bundled real data (see DESIGN.md, "The benchmark zoo")."""
