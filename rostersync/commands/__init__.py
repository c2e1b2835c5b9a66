"""CLI commands that live in their own modules; rostersync.cli registers them."""
