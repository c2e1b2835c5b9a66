"""The `rostersync` command line: a thin shell over the library (entry point:
:func:`rostersync.cli.main.main`). Nothing in the library imports it."""
