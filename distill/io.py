"""Temporary alias of distill.fileio, kept only until distill/data.py and distill/trainer.py import
`.fileio` (the module was renamed so it no longer shadows the standard library's `io`): delete then."""
from .fileio import (atomic_write_bytes, atomic_write_text, fsync_file, fsync_tree, pause_point,  # noqa: F401
                     ran_out_of_space)
