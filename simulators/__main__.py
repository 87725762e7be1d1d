"""``python -m simulators {broker,scales,demo} ...`` (see ``--help`` of each command)."""

from simulators.warehouse import main

raise SystemExit(main())
