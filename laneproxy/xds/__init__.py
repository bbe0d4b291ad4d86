"""laneproxy's xDS: the resources a RouteTable becomes (resources), the controller's delta ADS server
(server), its counters (stats) and the `laneproxy controller` process (controller).

Needs the `xds` extra (grpcio, xds-protos). Nothing here is imported by the data plane.
"""
