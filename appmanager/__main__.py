from appmanager.cli import main

main()
