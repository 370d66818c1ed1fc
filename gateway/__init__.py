"""The gateway agent: turns the hub's routing table into a running HAProxy (``mmanager gateway serve``)."""
