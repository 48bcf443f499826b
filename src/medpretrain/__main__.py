from medpretrain.cli import main

main()
