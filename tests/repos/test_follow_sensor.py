"""Following in Dagster: the repo_follow sensor keeps one atproto/repo_stream run per followed host (none
while one is alive, the next after one ended or failed; a run whose worker is gone, as its lease on the host
shows, is marked failed), a follow run applies the dev-env PDS's stream and reports what it did; the stream stores only REPO_COLLECTIONS; the repo_sync sensor shares a busy bucket
between several runs."""

import os
import signal
import subprocess
import sys

import dagster as dg
from dagster._core.test_utils import create_run_for_test

from migration_assets.cli import main
from migration_assets.core.backoff import Backoff
from migration_assets.core.resources import PostgresResource
from migration_assets.core.settings import PROJECT_ROOT
from migration_assets.repos import ledger
from migration_assets.repos.buckets import bucket_key, bucket_of
from migration_assets.repos.follow import save_cursor
from migration_assets.repos.follow_assets import REPO_STREAM, followed_hosts, repo_stream
from migration_assets.repos.resources import RepoSourceResource
from migration_assets.repos.sensors import FOLLOW_HOST_TAG, repo_follow, repo_sync
from tests.repos.conftest import handle
from tests.repos.helpers import listed_records, stored_records, sync_dids
from tests.repos.test_follow import LIKES, POSTS, current_seq, exact, following, post, wait_until

OTHER_HOST = "http://127.0.0.1:9"  # never contacted: the sensor reads only run records


def follow_tick(instance) -> dg.SensorResult:
    result = repo_follow(dg.build_sensor_context(instance=instance, resources={"postgres": PostgresResource()}))
    for request in result.dynamic_partitions_requests:  # what the daemon does with them
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def by_host(result: dg.SensorResult) -> dict[str, dg.RunRequest]:
    return {request.partition_key: request for request in result.run_requests}


def follow_run(instance, host: str, request: dg.RunRequest | None = None, **config) -> dg.ExecuteInProcessResult:
    """Execute a follow run as the daemon would launch the sensor's request (same partition and tags)."""
    tags = request.tags if request else {FOLLOW_HOST_TAG: host}
    return dg.materialize(
        [repo_stream], partition_key=host, instance=instance, tags=tags, raise_on_error=False,
        resources={"postgres": PostgresResource(), "repo_source": RepoSourceResource()},
        run_config={"ops": {"atproto__repo_stream": {"config": config}}},
    )


def test_one_run_per_host_none_while_alive_and_the_next_after_it_ends(pds, target, instance, monkeypatch):
    host = pds.pds.url
    monkeypatch.setenv("REPO_FOLLOW_HOSTS", f"{host},{OTHER_HOST}")
    first = follow_tick(instance)
    assert set(by_host(first)) == {host, OTHER_HOST}
    assert set(instance.get_dynamic_partitions(followed_hosts.name)) == {host, OTHER_HOST}
    assert {r.tags[FOLLOW_HOST_TAG] for r in first.run_requests} == {host, OTHER_HOST}
    assert by_host(follow_tick(instance))[host].run_key == by_host(first)[host].run_key, \
        "a tick repeated before the run shows up must ask for the same run"

    for status in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTED):  # (QUEUED needs a code location)
        alive = create_run_for_test(instance, status=status, tags={FOLLOW_HOST_TAG: host})
        assert set(by_host(follow_tick(instance))) == {OTHER_HOST}, f"a {status} run got company"
        beside = create_run_for_test(instance, status=dg.DagsterRunStatus.FAILURE, tags={FOLLOW_HOST_TAG: host})
        assert set(by_host(follow_tick(instance))) == {OTHER_HOST}, f"a {status} run got company after a newer run failed"
        for run in (alive, beside):
            instance.delete_run(run.run_id)

    ended = create_run_for_test(instance, status=dg.DagsterRunStatus.SUCCESS, tags={FOLLOW_HOST_TAG: host})
    after = by_host(follow_tick(instance))[host]
    assert after.run_key != by_host(first)[host].run_key and ended.run_id in after.run_key


def test_a_follow_run_applies_the_stream_and_reports_it(pds, target, instance, monkeypatch):
    host = pds.pds.url
    monkeypatch.setenv("REPO_FOLLOW_HOSTS", host)
    alice = pds.create_account(handle())
    keys = pds.create_records(alice, POSTS, [post(n) for n in range(3)])
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))
    pds.create_records(alice, POSTS, [post(n) for n in range(3, 6)])  # one commit
    pds.update_records(alice, POSTS, {keys[0]: post(100)})
    pds.delete_records(alice, POSTS, keys[1:2])

    request = by_host(follow_tick(instance))[host]
    result = follow_run(instance, host, request, seconds=8)  # bounded, as REPO_FOLLOW_RUN_SECONDS bounds a run

    assert result.success
    assert exact(pds, target, alice, (POSTS,))
    materialization = result.asset_materializations_for_node("atproto__repo_stream")[0]
    meta = {name: value.value for name, value in materialization.metadata.items()}
    assert materialization.partition == host and materialization.asset_key == REPO_STREAM
    assert meta["events_applied"] == 3 and meta["desyncs"] == 0 and meta["resyncs"] == 0, meta
    # The events were made in this test: a lag of hours (a clock or unit mixed up) would be wrong.
    assert meta["events_per_second"] > 0 and 0 <= meta["lag_seconds"] < 600 and meta["cursor"] > 0, meta
    assert request.run_key != by_host(follow_tick(instance))[host].run_key


def test_the_sensor_restarts_a_failed_run_after_a_backoff(pds, target, instance, monkeypatch):
    host = pds.pds.url
    monkeypatch.setenv("REPO_FOLLOW_HOSTS", host)
    save_cursor(target, host, 10**12)  # ahead of the host: it answers FutureCursor, and the run fails
    request = by_host(follow_tick(instance))[host]
    failed = follow_run(instance, host, request, seconds=30)
    assert not failed.success
    failure = next(e for e in failed.all_events if e.is_step_failure)
    assert "FutureCursor" in failure.step_failure_data.error.message
    assert "repo_stream_cursors" in failure.step_failure_data.error.message  # names the next step

    assert host not in by_host(follow_tick(instance)), "a failed run is restarted at once, without backoff"
    monkeypatch.setattr("migration_assets.repos.sensors.FOLLOW_RESTART", Backoff(base=1e-6, cap=1e-6))
    restart = by_host(follow_tick(instance))[host]
    assert failed.run_id in restart.run_key and restart.tags[FOLLOW_HOST_TAG] == host


def hold_lease(conn, host: str, run_id: str, held: bool = True, expires_in: str = "1 hour",
               updated: str = "0 seconds") -> None:
    """The host's lease row as follow run `run_id` left it (`held`: a token on it, expiring `expires_in`
    from now; else given back `updated` ago)."""
    conn.execute(
        """INSERT INTO repo_stream_leases (host, holder, claim_token, lease_expires_at, updated_at)
           VALUES (%(host)s, %(run)s, CASE WHEN %(held)s THEN gen_random_uuid() END,
                   CASE WHEN %(held)s THEN now() + %(expires)s::interval END, now() - %(updated)s::interval)
           ON CONFLICT (host) DO UPDATE SET holder = excluded.holder, claim_token = excluded.claim_token,
               lease_expires_at = excluded.lease_expires_at, updated_at = excluded.updated_at""",
        {"host": host, "run": run_id, "held": held, "expires": expires_in, "updated": updated},
    )


def test_a_running_follow_run_is_marked_failed_only_once_its_lease_shows_its_worker_gone(target, instance, monkeypatch):
    """Dagster's default launcher cannot tell a dead run worker: the host's lease tells the sensor."""
    monkeypatch.setenv("REPO_FOLLOW_HOSTS", OTHER_HOST)
    run = create_run_for_test(instance, status=dg.DagsterRunStatus.STARTED, tags={FOLLOW_HOST_TAG: OTHER_HOST})
    alive = {
        "it has not taken the lease yet (just started)": lambda: target.execute("DELETE FROM repo_stream_leases"),
        "it holds the lease": lambda: hold_lease(target, OTHER_HOST, run.run_id),
        "it gave the lease back a moment ago (it is ending)": lambda: hold_lease(target, OTHER_HOST, run.run_id, held=False),
        "another follower holds the lease (this one waits for it)": lambda: hold_lease(target, OTHER_HOST, "another"),
    }
    for why, state in alive.items():
        state()
        assert follow_tick(instance).run_requests == [], why
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED, f"{why}: marked failed"

    hold_lease(target, OTHER_HOST, run.run_id, expires_in="-1 second")  # it stopped renewing: gone
    assert follow_tick(instance).run_requests == [], "the next run waits for the restart backoff"
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    failure = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    assert "worker gone" in failure[0].event_log_entry.dagster_event.message and "lapsed" in \
        failure[0].event_log_entry.dagster_event.message
    monkeypatch.setattr("migration_assets.repos.sensors.FOLLOW_RESTART", Backoff(base=1e-6, cap=1e-6))
    assert run.run_id in by_host(follow_tick(instance))[OTHER_HOST].run_key


def test_a_follow_run_that_gave_its_lease_back_long_ago_or_never_took_it_is_gone(target, instance, monkeypatch):
    monkeypatch.setenv("REPO_FOLLOW_HOSTS", OTHER_HOST)
    monkeypatch.setenv("REPO_LEASE_SECONDS", "5")
    monkeypatch.setattr("migration_assets.repos.sensors.START_GRACE_SECONDS", 1.0)
    cases = {
        "gave the host's lease back": lambda run: hold_lease(target, OTHER_HOST, run.run_id, held=False, updated="1 minute"),
        "did not take the host's lease within 6 s": lambda run: target.execute("DELETE FROM repo_stream_leases"),
    }
    for why, state in cases.items():
        run = create_run_for_test(instance, status=dg.DagsterRunStatus.STARTED, tags={FOLLOW_HOST_TAG: OTHER_HOST})
        state(run)
        wait_until("the start grace to pass", lambda: follow_tick(instance) is not None and
                   instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE, timeout=30, every=1.0)
        failure = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
        assert why in failure[0].event_log_entry.dagster_event.message


def test_a_killed_follow_run_is_marked_failed_and_the_next_run_resumes_exact(pds, target, dagster_home, instance,
                                                                            monkeypatch):
    """A follow run SIGKILLed (here the command's: tagged as the sensor's) stays STARTED in the instance;
    once its lease on the host lapses, the sensor marks it failed and starts the next, which goes on."""
    host = pds.pds.url
    monkeypatch.setenv("REPO_FOLLOW_HOSTS", host)
    monkeypatch.setenv("REPO_LEASE_SECONDS", "5")
    alice = pds.create_account(handle())
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))
    pds.create_records(alice, POSTS, [post(1)])
    host_runs = dg.RunsFilter(tags={FOLLOW_HOST_TAG: host})
    before = {run.run_id for run in instance.get_runs(filters=host_runs)}  # the session's other tests' runs
    command = [sys.executable, "-m", "migration_assets.cli", "repos", "follow", "--host", host]
    follower = subprocess.Popen(command, env=os.environ | {"PYTHONPATH": str(PROJECT_ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until("the command to apply the commit", lambda: exact(pds, target, alice, (POSTS,)) or
                   follower.poll() is not None)
        [run] = [run for run in instance.get_runs(filters=host_runs) if run.run_id not in before]
        assert follow_tick(instance).run_requests == [], "a live follow run got company"
    finally:
        follower.send_signal(signal.SIGKILL)
        output = follower.communicate()[0].decode()
    assert exact(pds, target, alice, (POSTS,)), output
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED, "killed, as the launcher sees it"

    wait_until("the sensor to find the run's worker gone", lambda: follow_tick(instance) is not None and
               instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE, timeout=60, every=1.0)
    monkeypatch.setattr("migration_assets.repos.sensors.FOLLOW_RESTART", Backoff(base=1e-6, cap=1e-6))
    request = by_host(follow_tick(instance))[host]
    assert run.run_id in request.run_key
    pds.create_records(alice, POSTS, [post(2)])
    result = follow_run(instance, host, request, seconds=8)
    assert result.success and exact(pds, target, alice, (POSTS,))


def test_the_stream_stores_only_the_filtered_collections(pds, target, target_url, instance, monkeypatch):
    monkeypatch.setenv("REPO_COLLECTIONS", "app.bsky.feed.*")
    host = pds.pds.url
    alice = pds.create_account(handle())
    pds.create_records(alice, POSTS, [post(1)])
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))

    with following(target_url, host) as follower:
        pds.create_records(alice, LIKES, [{"subject": "s", "createdAt": "2026-12-04T10:00:00Z"}])
        [rkey] = pds.create_records(alice, POSTS, [post(2)])
        wait_until("the post", lambda: (POSTS, rkey) in stored_records(target, alice.did))

    assert follower.report.applied == 2 and follower.report.desyncs == 0, follower.report
    assert listed_records(pds.pds.url, alice.did, LIKES), "the like was not created"
    assert {collection for collection, _ in stored_records(target, alice.did)} == {POSTS}
    assert exact(pds, target, alice, (POSTS,))  # and the ledger counts only what is stored


def dids_in_bucket(bucket: int, count: int, buckets: int = 256) -> list[str]:
    found, n = [], 0
    while len(found) < count:
        did = f"did:plc:share{n:020d}"
        if bucket_of(did, buckets) == bucket:
            found.append(did)
        n += 1
    return found


def test_a_busy_bucket_gets_several_runs_a_quiet_one_gets_one(target, instance, monkeypatch):
    monkeypatch.setenv("REPO_CLAIM_BATCH", "2")  # another run per 8 due repos
    monkeypatch.setenv("REPO_RUNS_PER_BUCKET", "3")
    busy, quiet = 7, 11
    ledger.request_sync(target, dids_in_bucket(busy, 30) + dids_in_bucket(quiet, 8), 256)
    context = dg.build_sensor_context(
        instance=instance, resources={"postgres": PostgresResource(), "repo_source": RepoSourceResource()})
    requests = repo_sync(context).run_requests

    keys = [r.partition_key for r in requests]
    assert sorted(keys) == sorted([bucket_key(busy)] * 3 + [bucket_key(quiet)]), keys
    assert len({r.run_key for r in requests}) == len(requests), "runs of one bucket need distinct run keys"


def test_the_follow_command_is_a_run_in_the_instance_and_fails_non_zero(pds, target, dagster_home, instance, capsys):
    host = pds.pds.url
    alice = pds.create_account(handle())
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))
    pds.create_records(alice, POSTS, [post(1)])

    cli_runs = dg.RunsFilter(tags={"migration-assets/cli": "repos follow"})
    before = {run.run_id for run in instance.get_runs(filters=cli_runs)}  # the session's other tests' runs
    code = main(["repos", "follow", "--host", host + "/", "--seconds", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "done: 1 events (1 commits applied" in out and "0 desyncs" in out, out
    assert exact(pds, target, alice, (POSTS,))
    runs = [run for run in instance.get_runs(filters=cli_runs) if run.run_id not in before]
    assert [run.tags.get("dagster/partition") for run in runs] == [host], "the command's run must show in the instance"

    save_cursor(target, host, 10**12)
    code = main(["repos", "follow", "--host", host, "--seconds", "30"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FutureCursor" in out and "repo_stream_cursors" in out and "next step:" in out, out


def test_the_follow_command_exits_non_zero_naming_the_follower_that_holds_the_host(pds, target, dagster_home, instance,
                                                                                  capsys, monkeypatch):
    monkeypatch.setenv("REPO_LEASE_SECONDS", "5")  # it waits one lease for the holder's to lapse
    host = pds.pds.url
    save_cursor(target, host, current_seq(host))
    hold_lease(target, host, "the sensor's run")  # renewed: it expires an hour from now
    code = main(["repos", "follow", "--host", host, "--seconds", "30"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "another follower of" in out and "(the sensor's run) holds it" in out and "Stop that one first" in out, out
    assert "next step:" in out and "fix the cause" not in out, out


def test_the_follow_command_exits_non_zero_when_a_resync_fails(pds, target, dagster_home, instance, capsys):
    """The stream applies, but a repo it desyncs cannot be fetched again (its stored DID document names a
    PDS that is down): the command says so, with the next step, and exits 1."""
    host = pds.pds.url
    alice = pds.create_account(handle())
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))
    target.execute("UPDATE repos SET rev = '2222222222222' WHERE did = %s", (alice.did,))  # the next commit won't follow it
    target.execute("UPDATE did_documents SET document = jsonb_set(document, '{pds_endpoint}', '\"http://127.0.0.1:9\"')"
                   " WHERE did = %s", (alice.did,))
    pds.create_records(alice, POSTS, [post(1)])
    code = main(["repos", "follow", "--host", host, "--seconds", "5"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "1 desyncs" in out and "1 resyncs failed" in out and "next step:" in out, out
    row = target.execute("SELECT status, last_error FROM repos WHERE did = %s", (alice.did,)).fetchone()
    assert row[0] == "error" and "127.0.0.1:9" in row[1], row
