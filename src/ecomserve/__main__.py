from ecomserve.cli import main

main()
