from rostersync.cli.main import main

main()
