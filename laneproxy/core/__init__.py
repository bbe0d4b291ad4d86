"""The pure core: deterministic, synchronous code with no sockets, no asyncio and no third-party I/O.

Time and randomness come in as parameters, so every rule here is testable exactly.
"""
