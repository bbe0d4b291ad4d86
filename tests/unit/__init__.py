"""Unit tier: the pure core, table-driven, no sockets, no sleeps, no real clocks or randomness."""
