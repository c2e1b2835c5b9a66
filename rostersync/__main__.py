from rostersync.cli.console import console

console()
