"""Where workflows keep processes and events: one module per database."""
