"""Measuring: metrics against a reference, class fractions of a label map, and simulated
annotators (strokes, corrections) for the demo, benchmarks and tests."""
