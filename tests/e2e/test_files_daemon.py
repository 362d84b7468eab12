"""The file-migration run window with the real daemon: a range launched (as from the UI's launchpad)
while its window is closed copies nothing and says when the window opens; launched inside an open
window, it copies and verifies every file. The window is placed around the real clock through the
run's `files` resource config, so the test controls which side of it "now" falls on."""

import json
from datetime import datetime, timedelta, timezone

import boto3

from migration_assets.devstack.demo import SERVERS_FILE
from tests.e2e.stack import LOCATION, REPOSITORY, wait_until

RANGE = "000000000000-000000000100"  # file ids 1-99 of the demo's 300
LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
RESOURCE = """
query($selector: ResourceSelector!) {
  topLevelResourceDetailsOrError(resourceSelector: $selector) { ... on ResourceDetails { configuredValues { key value } } }
}"""
RUN = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""
FAILURE_MESSAGES = """
query($id: ID!) {
  logsForRun(runId: $id) { ... on EventConnection { events { ... on ExecutionStepFailureEvent { error { message } } } } }
}"""
CHECKS = """
query($check: String!) {
  assetCheckExecutions(assetKey: {path: ["files", "copied_files"]}, checkName: $check, partition: "%s", limit: 1) {
    evaluation { success description }
  }
}""" % RANGE


def launch(stack, window_start: datetime, window_end: datetime) -> str:
    files_config = {"run_window_enabled": True, "run_window_tz": "UTC", "run_window_weekends": False,
                    "run_window_start": f"{window_start:%H:%M}", "run_window_end": f"{window_end:%H:%M}"}
    params = {
        "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": "__ASSET_JOB",
                     "assetSelection": [{"path": ["files", "copied_files"]}]},
        "runConfigData": {"resources": {"files": {"config": files_config}}},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": RANGE}]},
    }
    launched = stack.graphql(LAUNCH_RUN, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    finished = lambda: stack.graphql(RUN, id=run_id)["runOrError"]["status"] in ("SUCCESS", "FAILURE")  # noqa: E731
    wait_until(finished, 300, f"the file range run {run_id}", stack)
    return run_id


def copied_keys(stack) -> list[str]:
    s3_url = json.loads((stack.data_dir / SERVERS_FILE).read_text())["SeaweedFS S3"]
    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                      aws_access_key_id="local", aws_secret_access_key="local")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="migrated-files")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_runs_copy_only_inside_the_run_window(stack):
    now = datetime.now(timezone.utc)
    closed = launch(stack, now + timedelta(hours=2), now + timedelta(hours=3))
    assert stack.graphql(RUN, id=closed)["runOrError"]["status"] == "FAILURE"
    events = stack.graphql(FAILURE_MESSAGES, id=closed)["logsForRun"]["events"]
    messages = " ".join(e["error"]["message"] for e in events if e.get("error"))
    assert "outside the run window" in messages and "it opens at" in messages, messages
    assert copied_keys(stack) == [], "a run outside its window copied files"

    now = datetime.now(timezone.utc)
    opened = launch(stack, now - timedelta(hours=1), now + timedelta(hours=1))
    assert stack.graphql(RUN, id=opened)["runOrError"]["status"] == "SUCCESS", stack.log_tail()
    assert len(copied_keys(stack)) == 99
    for check in ("files_copied", "s3_checksums"):
        [execution] = stack.graphql(CHECKS, check=check)["assetCheckExecutions"]
        assert execution["evaluation"]["success"], (check, execution)


def test_the_files_resource_shows_the_values_in_force(stack):
    """The UI's Resources page (and the launchpad's defaults) show the FILES_* values runs will use:
    the demo turns the run window off, against FilesSettings' default of on."""
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "resourceName": "files"}
    details = stack.graphql(RESOURCE, selector=selector)["topLevelResourceDetailsOrError"]
    shown = {value["key"]: json.loads(value["value"]) for value in details["configuredValues"]}
    assert shown["run_window_enabled"] is False and shown["bucket"] == "migrated-files", shown
    assert shown["source_root"] == str((stack.data_dir / "files-source").resolve()), shown
