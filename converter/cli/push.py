"""``quantize-model push FOLDER REPO``: upload a finished conversion with a model card (resumable)."""

from __future__ import annotations

from pathlib import Path

import click

from converter.cli._app import App, not_empty_path, sigterm_as_interrupt


@click.command("push")
@click.argument("folder", callback=not_empty_path)
@click.argument("repo")
@click.option(
    "--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility)."
)
@click.option("--revision", default=None, help="Branch to push to (created if missing); default main.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but warnings and errors.")
@click.pass_obj
def push(
    app: App, folder: Path, repo: str, private: bool, revision: str | None, as_json: bool, quiet: bool
) -> None:
    """Upload the quantized FOLDER to the Hub repo REPO, with a model card.

    Creates REPO if needed. Rerun the same command after an interruption: files already on the Hub
    are not uploaded again. Authentication as huggingface_hub does it (`hf auth login` or HF_TOKEN).
    """
    from converter.tools.push import push_folder

    app.configure(json=as_json, quiet=quiet)
    with sigterm_as_interrupt():  # a CI job cancelled or timed out: the one line (and JSON), exit 143
        url = push_folder(folder, repo, private=private, revision=revision)
    if app.json:
        app.print_json(
            {"ok": True, "folder": str(folder), "repo_id": repo, "url": url, "revision": revision or "main"}
        )
        return
    app.info(f"{folder}: pushed to {url}")
