"""The console's pages over HTTP, in process, on the hub with real PostgreSQL (no browser: what is checked is
the hub's answer): a token that cannot be one is refused at login and a cookie holding one is an ended
session, never a 500; logging out makes no API call; an error page never shows a value sent under
``registry_auth``; the services and alerts pages are newest first, a page at a time, with a link to the
next."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from hub.models import AlertModel, JobAttemptModel, JobModel, ServiceModel, UserModel, utcnow
from hub.ui import pages, security
from tests.hub.conftest import Cluster
from tests.support.console import ConsoleSession, csrf_of


def browser(cluster: Cluster, **cookies: str) -> httpx.AsyncClient:
    # The hub's own in-process transport, without the admin's Authorization header: a browser sends none.
    return httpx.AsyncClient(transport=cluster.hub._transport, base_url="http://hub", cookies=cookies, timeout=60)


async def test_a_token_that_cannot_be_one_ends_the_session_and_logout_makes_no_api_call(cluster: Cluster) -> None:
    async with browser(cluster) as client:
        console = ConsoleSession(client)
        for bad in ("mmh_tökén", "mmh_" + "x" * security.MAX_TOKEN):
            refused = await console.log_in(bad)
            assert refused.status_code == 422 and "TOKEN_MALFORMED" in refused.text, refused.text
            assert "mm_session" not in client.cookies

    # A cookie no browser session of this console could have set: to the login page, the cookie dropped.
    async with browser(cluster) as client:
        for cookie in ("mm_session=mmh_t\xc3\xb6k\xc3\xa9n".encode("latin-1"), b"mm_session=" + b"x" * 600):
            for path in ("/ui/services", "/ui/audit"):
                answer = await client.get(path, headers={"Cookie": cookie})
                assert answer.status_code == 303, (path, answer.text)
                assert answer.headers["location"] == "/ui/login?expired=true"
                assert answer.headers["set-cookie"].startswith('mm_session="";')
            followed = await client.get("/ui/services/x/logs/follow", headers={"Cookie": cookie})
            assert followed.status_code == 401
            logout = await client.post("/ui/logout", headers={"Cookie": cookie, "Origin": "http://hub"})
            assert logout.status_code == 303 and logout.headers["set-cookie"].startswith('mm_session="";')

    # Logging out of a session whose token the hub no longer accepts: the cookie goes, and the API is not
    # asked (it would have recorded the token's refusal).
    revoked = "mmh_" + "r" * 43
    async with browser(cluster, mm_session=revoked) as client:
        forged = await client.post("/ui/logout", data={"csrf": security.csrf_token(revoked)},
                                   headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403 and "CSRF_REFUSED" in forged.text
        out = await client.post("/ui/logout", data={"csrf": security.csrf_token(revoked)},
                                headers={"Origin": "http://hub"})
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        assert out.headers["set-cookie"].startswith('mm_session="";')
    refusals = (await cluster.hub.get("/api/admin/audit", params={"actor": "anonymous"})).json()
    assert [r["path"] for r in refusals if r["path"].startswith("/api/")] == []


async def test_errors_hide_secrets_sent_and_the_services_page_is_newest_first_by_pages(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    async with browser(cluster) as client:
        console = ConsoleSession(client)
        assert (await console.log_in(cluster.admin_token)).status_code == 303
        password = "987654321012"
        spec = f"name: reg\nimage: x:1\nregistry_auth:\n  username: u\n  password: {password}\n"
        refused = await console.post("/ui/deploy", "/ui/deploy", {"mode": "spec", "spec": spec})
        assert refused.status_code == 422 and "registry_auth.password" in refused.text, refused.text
        assert password not in refused.text

        async with cluster.db.session() as session:
            admin = await session.scalar(select(UserModel).where(UserModel.username == "admin"))
            assert admin is not None
            first = (await session.scalar(select(UserModel.created_at).where(UserModel.id == admin.id)))
            assert first is not None
            for i in range(3):
                session.add(ServiceModel(name=f"paged-{i}", owner_id=admin.id, repo="default", spec={},
                                         created_at=first + timedelta(minutes=i)))
                session.add(AlertModel(kind="cpu", controller_id=f"alerting-{i}", value=90.0, threshold=80.0,
                                       started_at=first + timedelta(minutes=i)))
            await session.commit()
        monkeypatch.setattr(pages, "PAGE", 2)
        page = await client.get("/ui/services")
        assert page.status_code == 200, page.text
        assert page.text.index("paged-2") < page.text.index("paged-1") and "paged-0" not in page.text
        assert 'id="next-page"' in page.text
        following = page.text.split('id="next-page"')[0].rsplit('href="', 1)[1].split('"')[0]
        older = await client.get("/ui/services" + following.replace("&amp;", "&"))
        assert "paged-0" in older.text and "paged-2" not in older.text and 'id="previous-page"' in older.text
        assert csrf_of(older.text)

        alerts = await client.get("/ui/alerts")
        assert alerts.text.index("alerting-2") < alerts.text.index("alerting-1") and "alerting-0" not in alerts.text
        older = await client.get("/ui/alerts?offset=2")
        assert "alerting-0" in older.text and 'id="previous-page"' in older.text and 'id="next-page"' in alerts.text


async def test_the_jobs_pages_show_why_a_job_waits_its_attempts_and_progress_and_cancel_it(cluster: Cluster) -> None:
    async with cluster.db.session() as session:
        admin = await session.scalar(select(UserModel).where(UserModel.username == "admin"))
        assert admin is not None
        # Held back (not_before) so that no dispatcher takes it while the pages are read.
        waiting = JobModel(name="feat", owner_id=admin.id, spec={"name": "feat", "image": "img:1", "command": ["run"]},
                           status="pending", status_message="no controller has room <now>",
                           wait_reasons=[{"controller_id": "gpu-01", "reason": "needs 1 GPU, 0 free"}],
                           not_before=utcnow() + timedelta(days=1), attempts=1, epoch=1,
                           progress={"done": 12_000, "total": 52_000, "unit": "records", "rate": 8_100})
        session.add(waiting)
        await session.flush()
        session.add(JobAttemptModel(job_id=waiting.id, number=1, controller_id="gpu-02", status="lost",
                                    error="controller gpu-02 was lost"))
        await session.commit()
    async with browser(cluster) as client:
        console = ConsoleSession(client)
        assert (await console.log_in(cluster.admin_token)).status_code == 303
        listed = await client.get("/ui/jobs")
        assert listed.status_code == 200, listed.text
        assert f'href="/ui/jobs/{waiting.id}"' in listed.text and "12,000/52,000 records (8,100 rec/s)" in listed.text
        page = await client.get(f"/ui/jobs/{waiting.id}")
        assert page.status_code == 200, page.text
        assert "no controller has room &lt;now&gt;" in page.text and "needs 1 GPU, 0 free" in page.text
        assert "controller gpu-02 was lost" in page.text
        done = await console.post(f"/ui/jobs/{waiting.id}/cancel", f"/ui/jobs/{waiting.id}", {"confirmed": "yes"})
        assert done.status_code == 303 and done.headers["location"] == f"/ui/jobs/{waiting.id}?done=cancelled"
        again = await console.post(f"/ui/jobs/{waiting.id}/cancel", f"/ui/jobs/{waiting.id}", {"confirmed": "yes"})
        assert again.status_code == 409 and "JOB_FINISHED" in again.text
        missing = await client.get("/ui/jobs/" + "0" * 32)
        assert missing.status_code == 404 and "JOB_NOT_FOUND" in missing.text
