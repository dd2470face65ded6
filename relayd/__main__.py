from relayd.main import main

main()
