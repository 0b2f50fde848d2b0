"""Services the request phases rely on: registry, caches, model loader, breaker, telemetry."""
