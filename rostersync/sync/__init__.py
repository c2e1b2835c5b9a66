"""The sync engine: fetch -> stage -> apply, plus the pure rules it applies."""
