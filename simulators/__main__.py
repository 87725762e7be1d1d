"""``python -m simulators {broker,scales,demo,plcs} ...`` (see ``--help`` of each command).

``plcs SITE`` runs the site's ``[[plcs]]`` (Modbus TCP conveyors and sorters) on 127.0.0.1;
see ``simulators/plc.py`` and ``docs/plc-integration.md``.
"""

import sys

from simulators.warehouse import main

if sys.argv[1:2] == ["plcs"]:
    import argparse

    from simulators.plc import add_plcs_arguments, plcs_main

    _parser = argparse.ArgumentParser(
        prog="python -m simulators plcs", description="Run the PLCs of a site on 127.0.0.1."
    )
    add_plcs_arguments(_parser)
    raise SystemExit(plcs_main(_parser.parse_args(sys.argv[2:])))

raise SystemExit(main())
