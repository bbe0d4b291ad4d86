"""laneproxy: a swimlane sidecar proxy for full-chain gray release.

The package's one import-time act is choosing which build of the hot path runs (compiled extensions or
the pure sources, laneproxy/compilation.py), since that must happen before any hot module is imported.
No event loop policy, no tracing set-up, no network.
"""

from laneproxy.compilation import choose as _choose

__version__ = "0.1.0"
BUILD = _choose()
