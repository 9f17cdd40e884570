"""The test kit: helpers the test files share, one concern per module.

``waiting`` (deadlines, polling a condition), ``tokens``, ``services`` (local
services for a tunnel to expose), ``clients`` (connections through it),
``tunnels`` (in-process gateways and agents: defaults and types), ``processes``
(``tunnelgate`` and other programs as subprocesses) and ``logs`` (recording
log lines). ``conftest.py`` holds the pytest hooks and fixtures built on these;
test files import what they use from the module that defines it.
"""
