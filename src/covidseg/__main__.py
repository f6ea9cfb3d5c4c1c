from covidseg.cli import main

main()
