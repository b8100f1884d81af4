"""Actions: what answers a request that may go on (the redirect lives in gateway.pipeline; the proxy here)."""
