from rostersync.cli import main

main()
