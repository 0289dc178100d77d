"""The scenario: the parameter table, presets, the link codec, batches and the
frameworks' conventions. Imports only settings, the engine registry and the files.
"""
