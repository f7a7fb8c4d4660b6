"""elkeid-agent: a drop-in Python replacement for the Elkeid host agent.

The version below is the single source of truth: packaging (pyproject,
nfpm, the zipapp) reads it from here.
"""

__version__ = "1.7.0.1"
PRODUCT = "elkeid-agent"
