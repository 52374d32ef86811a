# ruff: noqa: F811 - no_launch and model_dir are fixtures, imported to be used here
"""``ftlaunch export --push-to-hub REPO``: the complete exported folder goes to the Hub as one
commit, and what would make the upload fail for sure is refused before anything is written.

There is no network here, so huggingface_hub's two calls (``HfApi.create_repo`` and
``HfApi.upload_folder``) are replaced by recorders that also check, at upload time, that the
folder is the complete export (weights, tokenizer, settings, model card). Everything else is the
real CLI, in-process, on a finished run made without training (test_export_safety.reported_run).
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from conftest import run_cli_in_process
from test_bad_input import no_launch, refused  # noqa: F401 - no_launch is a fixture
from test_export_safety import reported_run
from test_outputs_and_model_files import model_dir  # noqa: F401 - model_dir is a fixture

REPO_ID = "someone/flan-t5-dialogsum"
EXPORTED = {"README.md", "config.json", "model.safetensors", "tokenizer.json", "ftlaunch.json"}


@pytest.fixture
def online(no_launch) -> dict[str, str]:
    """The CLI's environment with the Hub switched on and a token (the calls themselves are faked)."""
    env = {key: value for key, value in no_launch.items() if key != "HF_HUB_OFFLINE"}
    return {**env, "HF_TOKEN": "hf_test_token"}


@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Record create_repo and upload_folder instead of calling the Hub."""
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", {**kwargs, "files": {path.name for path in folder.iterdir()}}))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


@pytest.mark.parametrize("private", [False, True], ids=["public", "private"])
def test_the_complete_export_is_uploaded_as_one_commit(tmp_path, model_dir, online, hub_calls, private):
    run = reported_run(tmp_path, model_dir)
    out = tmp_path / "model"
    flags = ("--private",) if private else ()
    result = run_cli_in_process(
        "export", str(run), "--output", str(out), "--push-to-hub", REPO_ID, *flags, env=online
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [name for name, _ in hub_calls] == ["create_repo", "upload_folder"]
    created, uploaded = hub_calls[0][1], hub_calls[1][1]
    assert (created["repo_id"], created["private"], created["exist_ok"]) == (REPO_ID, private, True)
    assert uploaded["repo_id"] == REPO_ID and Path(uploaded["folder_path"]) == out
    assert uploaded["files"] >= EXPORTED  # the folder was complete (renamed into place) when uploaded
    assert uploaded["commit_message"] == "ftlaunch export of run"
    assert f"uploaded to https://huggingface.co/{REPO_ID}" in result.stdout


@pytest.mark.parametrize(
    ("repo", "env_change", "said"),
    [
        ("not a repo id", {}, "--push-to-hub 'not a repo id' is not a Hub repo id"),
        ("a/b/c", {}, "--push-to-hub 'a/b/c' is not a Hub repo id"),
        (REPO_ID, {"HF_HUB_OFFLINE": "1"}, f"--push-to-hub {REPO_ID}: HF_HUB_OFFLINE is set"),
        (REPO_ID, {"HF_TOKEN": None}, f"--push-to-hub {REPO_ID}: no Hugging Face token; run `hf auth login`"),
    ],
    ids=["spaces", "three parts", "offline", "no token"],
)
def test_an_upload_that_cannot_work_is_refused_before_the_export(
    tmp_path, model_dir, online, hub_calls, monkeypatch, repo, env_change, said
):
    run = reported_run(tmp_path, model_dir)
    env = {**online, **{key: value for key, value in env_change.items() if value is not None}}
    if "HF_TOKEN" in env_change:
        env.pop("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no token file either
    out = tmp_path / "model"
    refused(
        env,
        "export",
        str(run),
        "--output",
        str(out),
        "--push-to-hub",
        repo,
        output=out,
        watch=(run,),
        fragments=(said,),
    )
    assert hub_calls == []


def test_private_without_push_to_hub_is_refused(tmp_path, model_dir, online, hub_calls):
    run = reported_run(tmp_path, model_dir)
    out = tmp_path / "model"
    refused(
        online,
        "export",
        str(run),
        "--output",
        str(out),
        "--private",
        output=out,
        fragments=("--private applies to --push-to-hub",),
    )


def test_a_failed_upload_keeps_the_complete_export_and_names_the_command_to_retry(
    tmp_path, model_dir, online, hub_calls, monkeypatch
):
    def unreachable(self, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", unreachable)
    run = reported_run(tmp_path, model_dir)
    out = tmp_path / "model"
    result = run_cli_in_process(
        "export", str(run), "--output", str(out), "--push-to-hub", REPO_ID, env=online
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]  # beside progress bars
    assert errors == [
        f"error: exported to {out}, but the upload to {REPO_ID} failed (Failed to resolve 'huggingface.co'); "
        f"the folder is complete: upload it with `hf upload {REPO_ID} {out}`"
    ]
    assert {path.name for path in out.iterdir()} >= EXPORTED
