"""tpllama: tensor-parallel Llama inference over MPI for clusters of small CPU machines.

    import tpllama
    model = tpllama.load("model.gguf")            # collective over MPI.COMM_WORLD
    print(model.generate("Once upon a time", max_new_tokens=64).text)

Imports are lazy so that the command-line entry points can set thread variables
before numpy loads.
"""
import logging

__version__ = "0.1.0"

# The library reports on logger "tpllama" and prints nothing unless the application (or the
# command line, or verbose=True) gives that logger a handler.
logging.getLogger("tpllama").addHandler(logging.NullHandler())


def load(path=None, comm=None, **options):
    """Load a model sharded over `comm` (default MPI.COMM_WORLD); see tpllama.engine.load."""
    from .engine import load as _load
    return _load(path, comm, **options)


def __getattr__(name):
    if name in ("Model", "LoadOptions", "Generation"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
