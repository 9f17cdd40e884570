"""The admin listener: health, Prometheus metrics and a JSON API, on either side.

* :mod:`~tunnelgate.admin.server`: :class:`AdminServer`, the HTTP server
  (aiohttp), its credentials and its routes, for any :class:`Site`;
* :mod:`~tunnelgate.admin.metrics`: the Prometheus collector that reads a
  side's ``statistics()`` at scrape time;
* :mod:`~tunnelgate.admin.sites`: what the gateway and the agent show.

Imported only when ``--admin`` is set: aiohttp and prometheus-client stay out
of a process that does not use them. The gateway and the agent must not
import this package; the CLI and the demo wire it to them.
"""
