from vision_server.cli import main

main()
