from edgepipe.cli import main

main()
