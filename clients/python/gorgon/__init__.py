"""gorgon: Python client of gorgond, over libgorgon (ctypes, no other
dependency).

    import gorgon
    with gorgon.Client() as c:
        for text in c.generate("Once upon a time", max_tokens=64):
            print(text, end="", flush=True)

    async with gorgon.AsyncClient() as c:
        async for text in c.generate("Once upon a time", max_tokens=64):
            print(text, end="", flush=True)

See clients/python/README.md.
"""

from ._lib import library_path
from .aio import AsyncClient, AsyncGeneration
from .client import Client, Completion, Generation, Group, ModelInfo, Stats, Usage
from .errors import GorgonError

__all__ = ["AsyncClient", "AsyncGeneration", "Client", "Completion", "Generation", "GorgonError",
           "Group", "ModelInfo", "Stats", "Usage", "library_path"]

__version__ = "0.1.0"
