"""The status page: views, templates and static files."""
