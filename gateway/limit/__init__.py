"""Per-client rate limits: pure algorithms (`algorithms`), their Redis scripts (`scripts`),
and the limiter the request path asks (`limiter`)."""
