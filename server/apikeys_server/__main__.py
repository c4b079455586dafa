from apikeys_server.cli import main

raise SystemExit(main())
