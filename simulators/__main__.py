"""``python -m simulators {broker,scales,demo,plcs} ...`` (see ``--help`` of each command).

``plcs SITE`` runs the site's ``[[plcs]]`` (Modbus TCP conveyors and sorters) on 127.0.0.1;
see ``simulators/plc.py`` and ``docs/plc-integration.md``.

The simulators need the ``sim`` extra (paho-mqtt), the demo's embedded broker the ``demo``
extra (amqtt); without them this says which to install.
"""

import sys

MISSING_EXTRA = {"paho": ("paho-mqtt", "sim"), "amqtt": ("amqtt", "demo")}
"""Top-level module -> (its package, the extra of pyproject.toml that installs it)."""

try:
    from simulators.warehouse import main

    code = main()
except ModuleNotFoundError as exc:
    top = (exc.name or "").split(".")[0]
    if top not in MISSING_EXTRA:
        raise
    package, extra = MISSING_EXTRA[top]
    print(
        f"simulators: the {package} package is not installed: pip install 'floorhand[{extra}]'",
        file=sys.stderr,
    )
    code = 2
raise SystemExit(code)
