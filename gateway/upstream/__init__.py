"""Upstream servers for the proxy action: connections, servers with their pools and health, balancing.

connection.py   one HTTP/1.1 client connection (llhttp response parser), pooled by gateway.pool.Pool
server.py       one server: its pool, its state (up, ejected), its counters
balancer.py     which server gets the next request (roundrobin, leastconn; weights)
health.py       active checks (rise/fall)
"""
