"""The Envoy-style admin server (aiohttp), one module per endpoint family: home/help, readiness, lifecycle,
server_info, stats, clusters, listeners, config_dump, loggers, and laneproxy's own lanes (/lanes, /route)."""
