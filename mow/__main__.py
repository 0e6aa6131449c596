from mow.cli import main

raise SystemExit(main())
