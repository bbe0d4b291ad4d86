"""The hot path: listeners, HTTP/1.1 codec glue, upstream connection pools and local replies.

Reads the RouteTable from the store once per request; never imports the control plane.
"""
