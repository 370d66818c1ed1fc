"""Service lifecycle: everything that changes a service's status, controller, container or epoch.

Invariant: a service's ``status``, ``controller_id``, ``container_id`` and ``epoch`` change only in this
package, and each change is recorded in ``container_operations`` (``hub.services.operations``).

``ServiceManager`` (``manager``) is the one front object the routers and the reconciler call; its parts:
``reads`` (the status read), ``create``, ``deploy`` (placing a copy and making its container), ``replace``
(a new copy for the old), ``moves`` (update, rollback, migrate, the reconciler's moves), ``actions`` (start,
stop, restart, status, logs, delete), over one shared ``context`` and the statements in ``sql``.
"""

from hub.services.lifecycle.deploy import container_name
from hub.services.lifecycle.manager import ServiceManager

__all__ = ["ServiceManager", "container_name"]
