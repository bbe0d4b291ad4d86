"""Configuration sources: read files or watch Kubernetes, build RouteTables, publish them to the store.

Never imports the data plane; the two meet only at laneproxy.core.store.RouteTableStore.
"""
