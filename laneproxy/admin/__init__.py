"""The Envoy-style admin server, one module per endpoint family: home/help, readiness, lifecycle, server_info,
stats, clusters, listeners, config_dump, loggers, and laneproxy's own lanes (/lanes, /route); admin.web is
the small HTTP/1.1 server they run on (the sidecar carries no aiohttp)."""
