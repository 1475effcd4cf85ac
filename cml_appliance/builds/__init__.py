"""Image builds: a durable queue in Postgres, the layer-append builder, reproducible layers."""
