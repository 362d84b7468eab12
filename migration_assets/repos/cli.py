"""`migration-assets repos backfill`: discover a host's repos and backfill every due bucket in-process.
`migration-assets repos follow`: apply a host's event stream (subscribeRepos) until stopped."""

import argparse
import time
from collections import Counter

from migration_assets.core.instance import project_instance
from migration_assets.core.resources import PostgresResource
from migration_assets.core.runs import materialize_partition, materialized_metadata, print_partition_summary
from migration_assets.repos import ledger
from migration_assets.repos.assets import REPOS, repo_ledger, repos
from migration_assets.repos.follow import BATCH_EVENTS
from migration_assets.repos.follow_assets import FOLLOW_HOST_TAG, REPO_STREAM, followed_hosts, repo_stream
from migration_assets.repos.buckets import bucket_key
from migration_assets.repos.resources import RepoSourceResource

COMMAND = "repos backfill"
FOLLOW_COMMAND = "repos follow"


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("repos", help="AT Protocol repos from their PDSes into PostgreSQL")
    actions = parser.add_subparsers(dest="action", required=True)
    backfill = actions.add_parser("backfill", help="discover repos and backfill every due one")
    backfill.add_argument("--host", action="append", default=[], help="PDS or relay to list repos from (repeatable)")
    backfill.add_argument("--did", action="append", default=[], help="only these DIDs, listed or not (repeatable)")
    backfill.add_argument("--no-verify", action="store_true", help="skip commit signature checks")
    backfill.set_defaults(handler=backfill_command)
    follow = actions.add_parser("follow", help="apply a host's event stream (subscribeRepos) to the stored repos")
    follow.add_argument("--host", required=True, help="PDS or relay URL to follow")
    follow.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    follow.add_argument("--no-verify", action="store_true", help="skip commit signature checks")
    follow.add_argument("--batch-events", type=int, default=BATCH_EVENTS, help="events per transaction (with the cursor)")
    follow.set_defaults(handler=follow_command)


def backfill_command(args: argparse.Namespace) -> int:
    if not args.host and not args.did:
        print("error: give --host URL (to list its repos) and/or --did DID")
        return 2
    source = RepoSourceResource(**({"verify_signatures": False} if args.no_verify else {}))
    resources = {"postgres": PostgresResource(), "repo_source": source}
    instance = project_instance()
    started = time.monotonic()
    hosts = [] if args.did else args.host  # explicit DIDs: sync just those
    config = {"ops": {"atproto__repo_ledger": {"config": {"hosts": hosts, "dids": args.did}}}}
    result = materialize_partition(instance, repo_ledger, None, resources, COMMAND, run_config=config)
    if not print_partition_summary("discovery", repo_ledger.key, result, discovery_summary):
        print("next step: check the host URL and that it answers com.atproto.sync.listRepos, then run again")
        return 1
    with resources["postgres"].connection() as conn:
        due = ledger.due_buckets(conn)
    print(f"{sum(n for n, _ in due.values())} repos due in {len(due)} buckets")
    outcomes, records, failed_runs = Counter(), 0, 0
    for bucket in due:
        key = bucket_key(bucket)
        result = materialize_partition(instance, repos, key, resources, COMMAND)
        failed_runs += not print_partition_summary(f"bucket {key}", REPOS, result, bucket_summary)
        metadata = materialized_metadata(result, REPOS) or {}
        outcomes.update(metadata.get("outcomes", {}))
        records += metadata.get("records_seen", 0)
    print_totals(outcomes, records, time.monotonic() - started)
    if failed_runs or outcomes["retry"] or outcomes["rate_limited"]:
        print("next step: repos with errors retry by themselves (backoff up to 1 h) when the repo_sync sensor "
              "runs, or run this command again; failures and reasons are in each bucket's metadata and the "
              "repos table (status 'error', last_error)")
        return 1
    return 0


def discovery_summary(meta: dict) -> str:
    return f"{meta['repos']} repos in the ledger, {meta['explicit_dids']} explicit DIDs"


def bucket_summary(meta: dict) -> str:
    outcomes = ", ".join(f"{n} {status}" for status, n in sorted(meta["outcomes"].items())) or "nothing due"
    waited = meta.get("repos_waited_for_busy_host", 0)
    return f"{outcomes}; {meta['records_seen']} records ({meta['records_created']} new, " \
           f"{meta['records_updated']} updated, {meta['records_deleted']} deleted)" \
           + (f"; {waited} waited for a busy host's download slot" if waited else "")


def print_totals(outcomes: Counter, records: int, seconds: float) -> None:
    repos_done = sum(outcomes.values())
    print(f"{repos_done} repos in {seconds:.1f} s: {60 * repos_done / seconds:.1f} users/min, "
          f"{records / seconds:.1f} records/s")
    print("outcomes: " + (", ".join(f"{status} {n}" for status, n in sorted(outcomes.items())) or "none"))


def follow_command(args: argparse.Namespace) -> int:
    """Follow one host as an in-process run of atproto/repo_stream (it shows in the UI) until Ctrl-C or
    --seconds: the batch in hand commits before it stops."""
    host = args.host.rstrip("/")
    source = RepoSourceResource(**({"verify_signatures": False} if args.no_verify else {}))
    resources = {"postgres": PostgresResource(), "repo_source": source}
    instance = project_instance()
    if not instance.has_dynamic_partition(followed_hosts.name, host):
        instance.add_dynamic_partitions(followed_hosts.name, [host])
    config = {"seconds": args.seconds, "until_stopped": args.seconds is None, "batch_events": args.batch_events}
    print(f"following {host}" + (f" for {args.seconds:.0f} s" if args.seconds else " until Ctrl-C"), flush=True)
    # Tagged as the sensor's runs are: the repo_follow sensor starts none beside it, and marks it failed if
    # this process is killed (its lease on the host lapses).
    result = materialize_partition(instance, repo_stream, host, resources, FOLLOW_COMMAND,
                                   run_config={"ops": {"atproto__repo_stream": {"config": config}}},
                                   tags={FOLLOW_HOST_TAG: host})
    if not print_partition_summary(host, REPO_STREAM, result, lambda meta: "done: " + follow_summary(meta)):
        print("next step: as the error above says; a follow run resumes from the last committed event")
        return 1
    metadata = materialized_metadata(result, REPO_STREAM) or {}
    if metadata.get("resync_failures"):
        print(f"next step: {metadata['resync_failures']} resyncs failed ({metadata['last_error']}); they retry with "
              "backoff when the repo_sync sensor runs or this command runs again (repos table: status 'error', "
              "last_error)")
        return 1
    return 0


def follow_summary(meta: dict) -> str:
    return (f"{meta['events']} events ({meta['events_applied']} commits applied, {meta['events_skipped']} skipped), "
            f"{meta['desyncs']} desyncs, {meta['resyncs']} resyncs ({meta['resync_failures']} failed); "
            f"cursor {meta['cursor']}; lag {meta['lag_seconds']:.1f} s; {meta['events_per_second']:.1f} events/s")
