from tracewire.cli import main

main()
