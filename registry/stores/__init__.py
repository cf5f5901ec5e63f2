"""Where the registry keeps its instances: one module per database."""
