from matchlock.cli import main

main()
