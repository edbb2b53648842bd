"""Distributed screening of cathode candidates on Ray Data (see :mod:`.pipeline`)."""
