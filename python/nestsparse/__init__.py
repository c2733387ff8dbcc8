from ._library import _C
