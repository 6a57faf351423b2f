from dtune.cli import main

main()
