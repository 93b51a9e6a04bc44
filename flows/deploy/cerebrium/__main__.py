"""python -m flows.deploy.cerebrium stage|preflight|deploy [ARTIFACT | models:/<name>@<alias>]"""

from flows.deploy.cerebrium.command import main

raise SystemExit(main())
