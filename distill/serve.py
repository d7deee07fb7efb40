"""Temporary alias of distill.teacher.serve (moved beside the HTTP client), kept only until
distill/cli.py imports `.teacher.serve`: delete then."""
from .teacher.serve import serve_forever  # noqa: F401
