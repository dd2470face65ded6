from sessiond.main import main

main()
