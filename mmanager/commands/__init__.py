"""The client commands of ``mmanager`` (docs/CLI.md): the hub's API through the SDK (``mmanager.client``),
beside the server commands of ``mmanager.cli``. ``attach`` adds them to its app and to its ``controllers``,
``models`` and ``users`` groups; nothing here imports the SDK until a client command runs."""

from __future__ import annotations

import typer


def attach(app: typer.Typer, controllers: typer.Typer, models: typer.Typer, users: typer.Typer) -> None:
    from mmanager.commands import (
        alerts,
        apply,
        artifacts,
        audit,
        catalog,
        images,
        jobs,
        login,
        model_files,
        operations,
        pipelines,
        services,
    )
    from mmanager.commands import controllers as controller_commands
    from mmanager.commands import users as user_commands

    app.command("login")(login.login)
    app.command("logout")(login.logout)
    app.command("apply")(apply.apply_command)
    app.add_typer(services.app, name="services")
    app.add_typer(operations.app, name="operations")
    app.add_typer(alerts.app, name="alerts")
    app.add_typer(audit.app, name="audit")
    app.add_typer(images.app, name="images")
    app.add_typer(jobs.app, name="jobs")
    app.add_typer(artifacts.app, name="artifacts")
    app.add_typer(pipelines.app, name="pipelines")
    controller_commands.attach(controllers)
    catalog.attach(models)
    models.add_typer(model_files.app, name="files")
    user_commands.attach(users)
    app.add_typer(user_commands.tokens_app, name="tokens")
