from stella_cli.cli import main

main()
