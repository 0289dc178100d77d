"""Judging a comparison: verdicts, explain (alignments, Shapley shares) and the
document, the JSON made once at the edge. Never imports the page.
"""
