from rostersync.cli.main import console

console()
