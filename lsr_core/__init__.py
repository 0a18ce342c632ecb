"""decoder-lsr's shared package. The Python API (lsr_core/api.py) is re-exported here and imported on first use, so
that `import lsr_core.config` (every script) does not load torch:

    import lsr_core
    model = lsr_core.load("runs/demo/trained")
"""
_API = ("Encoder", "load", "build_index", "load_index", "search", "evaluate")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from lsr_core import api

        return getattr(api, name)
    raise AttributeError(f"module 'lsr_core' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
