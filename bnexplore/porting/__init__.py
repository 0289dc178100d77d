"""Porting: the translator between frameworks' knobs and the reproducer scripts."""
