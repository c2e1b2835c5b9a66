"""rostersync: keeps a platform's console users and class groups in step with school rosters."""

__version__ = "0.1.0"
