"""invariantd.protocol: pure data and logic, no I/O.

Nothing in this package may import trio, socket, cffi or open files other than its
own bundled data (a test enforces it). Register knowledge lives in data/ as tables.
"""
