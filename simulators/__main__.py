"""``python -m simulators {broker,scales,demo,plcs} ...`` (see ``--help`` of each command).

``plcs SITE`` runs the site's ``[[plcs]]`` (Modbus TCP conveyors and sorters) on 127.0.0.1;
see ``simulators/plc.py`` and ``docs/plc-integration.md``.
"""

from simulators.warehouse import main

raise SystemExit(main())
