"""Service lifecycle: everything that changes a service's status, controller, container or epoch.

``ServiceManager`` is the one front object the routers and the reconciler call.
"""

from hub.services.lifecycle.manager import ServiceManager, container_name, load_views

__all__ = ["ServiceManager", "container_name", "load_views"]
