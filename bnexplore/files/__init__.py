"""The user's files: the store (content-addressed, bounded) and the file formats it
reads without unpickling or following anything outside the file.
"""
