"""On-disk formats the server and the trainer both read or write, defined once.

Imports nothing from `server` or `trainer`; both import this package.
"""
