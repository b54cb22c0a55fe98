"""A module the first importing process of a server loads and every later one fails to.

Tests of a worker whose app fails to load alone (tests/test_e2e_gunicorn.py): the marker file
``LOAD_ONCE_MARKER`` names is created by the first import.
"""

import os

from transformers import Upper

__all__ = ["Upper"]

try:
    os.close(os.open(os.environ["LOAD_ONCE_MARKER"], os.O_CREAT | os.O_EXCL))
except FileExistsError:
    raise ImportError("load_once: already loaded by another process of this server") from None
