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
    missing = kernels_missing()
    if missing:
        from .errors import TpllamaError
        raise TpllamaError(missing, collective=True)
    from .engine import load as _load
    return _load(path, comm, **options)


def kernels_missing():
    """None when the compiled kernels (tpllama._kernels) sit beside this file; else one line
    saying what to do. The usual cause: `python -m tpllama...` run from a source checkout that
    was installed with `pip install .` - Python imports the checkout (the current folder), which
    has no build, instead of the installed copy."""
    import glob
    import os
    from importlib.machinery import EXTENSION_SUFFIXES
    here = os.path.dirname(os.path.abspath(__file__))
    if any(glob.glob(os.path.join(glob.escape(here), "_kernels" + suffix)) for suffix in EXTENSION_SUFFIXES):
        return None
    tree = os.path.dirname(here)
    if os.path.exists(os.path.join(tree, "setup.py")):
        return (f"tpllama's C kernels are not built in the source tree {tree}, which Python imports first "
                f"when run from there; build them in place with `pip install -e .` (as the README does) "
                f"or `python setup.py build_ext --inplace`, or run from another folder")
    return f"tpllama's C kernels are missing from {here}; reinstall tpllama (pip install --force-reinstall tpllama)"


def __getattr__(name):
    if name in ("Model", "LoadOptions", "Generation"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
