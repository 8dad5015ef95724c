"""The command line: `python -m service tokens ...` and the ops commands."""
