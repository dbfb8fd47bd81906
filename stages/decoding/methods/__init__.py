"""The decoding methods, one file each, found by :mod:`stages.decoding.registry` (never listed: a new file is a new
method). Importing this package imports none of them (no torch)."""

# the stage-version guard hashes every file of this folder for whoever imports it (pipeline/engine/stage_code.py)
PLUGIN_FOLDER = True
