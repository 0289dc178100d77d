"""The tools at the edge: the command line, the benchmark and the docs generator."""
