from zsad_cli import main

raise SystemExit(main())
