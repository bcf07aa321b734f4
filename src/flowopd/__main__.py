from flowopd.cli import main

raise SystemExit(main())
