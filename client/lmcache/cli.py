"""``python -m kvpack.client.lmcache.cli ARGS``: LMCache's own command line (``lmcache ARGS``)
with kvpack's serde registered first.

LMCache 0.5.6 imports no third-party serde modules by itself; an ``lmcache server`` whose
``--l2-adapter`` spec names ``"serde": {"type": "kvpack", ...}`` must run in a process that
imported kvpack.client.lmcache.serde before parsing its arguments. This is that process.
"""

from __future__ import annotations

import kvpack.client.lmcache.serde  # noqa: F401  (registers the "kvpack" serde type)


def main() -> None:
    from lmcache.cli.main import main as lmcache_main

    lmcache_main()


if __name__ == "__main__":
    main()
