"""Roster source connectors, each registered under the `rostersync.connectors` entry points."""
