from consumerd.main import main

main()
