"""laneproxy: a swimlane sidecar proxy for full-chain gray release.

The package has no import-time side effects: no event loop policy, no tracing set-up, no I/O.
"""

__version__ = "0.1.0"
