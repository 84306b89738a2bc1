from moetrace.cli.main import main

main()
