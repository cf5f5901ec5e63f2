"""The HTTP edge: error shape, JSON in and out, auth and sessions, shedding, SSE, OpenAPI."""
