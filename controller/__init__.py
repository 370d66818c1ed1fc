"""The mManager controller: a per-host agent that drives its own Docker daemon.

It speaks the mManager controller HTTP API as GeoML-Hub's client calls it (plus
the fields our hub adds, see ``mmanager.wire``) and only ever sees or touches
containers it labelled itself.
"""
