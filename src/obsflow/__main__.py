from obsflow.cli import main

main()
