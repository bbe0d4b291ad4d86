"""The Envoy-style admin server (aiohttp): readiness, stats, the lane table. One module per endpoint family."""
