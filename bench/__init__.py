"""Load benchmark of the bridge: `python -m bench --help`."""
