from chute.cli import main

main()
