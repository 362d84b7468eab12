"""Dagster assets of repo backfill: the ledger (discovery) and the repos of each hash bucket."""

import dagster as dg
from pydantic import Field

from migration_assets.core.dagster_glue import check_result, check_specs
from migration_assets.core.resources import PostgresResource
from migration_assets.repos import checks, ledger
from migration_assets.repos.backfill import BackfillReport, RepoOutcome, backfill_buckets
from migration_assets.repos.buckets import parse_bucket_key
from migration_assets.repos.discovery import discover, mark_out_of_scope
from migration_assets.repos.partitions import repo_buckets
from migration_assets.repos.resources import RepoSourceResource

REPO_LEDGER = dg.AssetKey(["atproto", "repo_ledger"])
REPOS = dg.AssetKey(["atproto", "repos"])


class DiscoveryConfig(dg.Config):
    hosts: list[str] = Field(default_factory=list, description="PDS or relay URLs to list (default REPO_DISCOVERY_HOSTS)")
    dids: list[str] = Field(default_factory=list, description="DIDs to (re)sync, listed or not")


def status_counts(conn) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM repos GROUP BY status ORDER BY status").fetchall())


def counts_table(counts: dict[str, int], first: str = "status") -> str:
    lines = [f"| {first} | repos |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()]
    return "\n".join(lines)


@dg.asset(
    key=REPO_LEDGER, group_name="atproto", kinds={"postgres"}, pool="atproto_pds",
    description="The repos ledger: every account to sync, from listRepos of the discovery hosts "
    "(all pages) and explicit DIDs. New DIDs enter as pending; repos whose head moved become due.",
)
def repo_ledger(
    context: dg.AssetExecutionContext, config: DiscoveryConfig, postgres: PostgresResource,
    repo_source: RepoSourceResource,
) -> dg.MaterializeResult:
    settings = repo_source.settings
    hosts = config.hosts or settings.discovery_hosts
    if not hosts and not config.dids:
        raise dg.Failure("nothing to discover: set REPO_DISCOVERY_HOSTS or pass hosts/dids in the run config")
    clients = repo_source.clients(postgres.resolved_url())
    per_host = []
    try:
        with postgres.connection() as conn:
            for host in hosts:
                progress = discover(conn, clients(host), settings.buckets, signal=settings.signal_collection)
                context.log.info(f"{host}: {progress.listed} repos listed in {progress.pages} pages, "
                                 f"{progress.new} new, {progress.due} due again")
                per_host.append(progress)
            explicit = ledger.request_sync(conn, config.dids, settings.buckets) if config.dids else 0
            while mark_out_of_scope(conn, settings.scope):  # a changed collection filter: those repos are due again
                pass
            conn.commit()
            totals = status_counts(conn)
    finally:
        clients.close()
    rows = [f"| {p.host} | {p.listed} | {p.new} | {p.due} |" for p in per_host]
    return dg.MaterializeResult(metadata={
        "hosts": dg.MetadataValue.md("\n".join(["| host | listed | new | due |", "|---|---|---|---|", *rows])),
        "explicit_dids": dg.MetadataValue.int(explicit),
        "repos_by_status": dg.MetadataValue.md(counts_table(totals)),
        "repos": dg.MetadataValue.int(sum(totals.values())),
        "dagster/row_count": dg.MetadataValue.int(sum(totals.values())),
    })


def outcome_metadata(report: BackfillReport) -> dict:
    failures = report.failures()
    failure_rows = [f"| {o.did} | {o.status} | {o.retry_at:%Y-%m-%d %H:%M:%S} | {(o.error or '')[:200]} |"
                    for o in failures[:50]]
    slowest = sorted(report.outcomes, key=lambda o: o.seconds, reverse=True)[:10]
    return {
        "repos": dg.MetadataValue.int(len(report.outcomes)),
        "outcomes": dg.MetadataValue.json(dict(report.by_status())),
        "records_seen": dg.MetadataValue.int(report.records_seen),
        "records_created": dg.MetadataValue.int(sum(o.changes.created for o in report.outcomes)),
        "records_updated": dg.MetadataValue.int(sum(o.changes.updated for o in report.outcomes)),
        "records_deleted": dg.MetadataValue.int(sum(o.changes.deleted for o in report.outcomes)),
        "car_megabytes": dg.MetadataValue.float(round(sum(o.car_bytes for o in report.outcomes) / 1e6, 2)),
        "repos_per_minute": dg.MetadataValue.float(round(report.repos_per_minute, 1)),
        "records_per_second": dg.MetadataValue.float(round(report.records_per_second, 1)),
        "seconds": dg.MetadataValue.float(round(report.seconds, 2)),
        "failures": dg.MetadataValue.md(
            "\n".join(["| did | outcome | next retry (UTC) | error |", "|---|---|---|---|", *failure_rows])
            if failures else "none"
        ),
        "repos_waited_for_busy_host": dg.MetadataValue.int(report.waited_for_host.total()),
        "busy_hosts": dg.MetadataValue.md(busy_hosts_table(report) if report.waited_for_host else "none"),
        "slowest_repos": dg.MetadataValue.md("\n".join(
            ["| did | seconds | records |", "|---|---|---|"]
            + [f"| {o.did} | {o.seconds:.2f} | {o.records} |" for o in slowest]
        )),
        "dagster/row_count": dg.MetadataValue.int(report.records_seen),
    }


def busy_hosts_table(report: BackfillReport) -> str:
    """The hosts that held their share of the downloads (REPO_HOST_CONCURRENCY) while more of their repos
    were due: those repos waited aside while the other hosts' went on."""
    rows = [f"| {host} | {n} |" for host, n in report.waited_for_host.most_common(50)]
    return "\n".join(["| host | repos that waited for a download slot |", "|---|---|", *rows])


@dg.asset(
    key=REPOS,
    partitions_def=repo_buckets,
    deps=[REPO_LEDGER],
    check_specs=check_specs(REPOS, checks.CHECKS, repo_buckets, warn=checks.WARN_CHECKS),
    group_name="atproto", kinds={"postgres"}, pool="atproto_pds",
    description="Each due repo of the bucket (pending, head moved, or retry due): resolve the DID, fetch "
    "the CAR, verify the commit signature, walk the MST, and store only what changed in `records`.",
)
def repos(
    context: dg.AssetExecutionContext, postgres: PostgresResource, repo_source: RepoSourceResource,
) -> dg.MaterializeResult:
    bucket = parse_bucket_key(context.partition_key)
    settings = repo_source.settings
    clients = repo_source.clients(postgres.resolved_url())
    pool = postgres.pool(settings.connections)

    def progress(outcome: RepoOutcome, done: int, total: int) -> None:
        message = f"{done}/{total} {outcome.did}: {outcome.status}, {outcome.records} records"
        if outcome.error:
            message += f" ({outcome.error[:300]})"
        context.log.info(message)

    try:
        report = backfill_buckets(pool, repo_source.syncer(pool, clients), [bucket], progress)
    finally:
        clients.close()
    if report.waited_for_host:
        context.log.info(f"{report.waited_for_host.total()} repos waited for their host's share of the "
                         f"downloads ({repo_source.host_concurrency} at once per host, REPO_HOST_CONCURRENCY) "
                         f"while the other hosts' went on: {dict(report.waited_for_host.most_common(10))}")
    with postgres.connection() as conn:
        outcomes = checks.run_checks(conn, [bucket])
    return dg.MaterializeResult(
        metadata=outcome_metadata(report),
        check_results=[check_result(outcome) for outcome in outcomes],
    )
