"""Experiments: the main job (`compare`), and the paper's suites."""
