from cml_appliance.cli import main

raise SystemExit(main())
