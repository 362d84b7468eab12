"""The README's table of every setting, made from the settings models so it cannot drift.

`python -m migration_assets.core.settings_table` prints it; `--write README.md` replaces the table
between the README's markers. A test fails when the README's table differs from the models.
"""

import argparse
import importlib
from pathlib import Path

from migration_assets.core.settings import EnvSettings

# Every pipeline's settings model, in the order the README shows them.
MODELS = (
    "migration_assets.core.settings:CoreSettings",
    "migration_assets.chain.settings:ChainSettings",
    "migration_assets.atproto.settings:AtprotoSettings",
    "migration_assets.repos.settings:RepoSettings",
    "migration_assets.blobs.settings:BlobSettings",
    "migration_assets.files.settings:FilesSettings",
)
START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"


def settings_models() -> list[type[EnvSettings]]:
    models = []
    for path in MODELS:
        module, name = path.split(":")
        models.append(getattr(importlib.import_module(module), name))
    return models


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = [START, "| variable | default | what it is |", "|---|---|---|"]
    for model in settings_models():
        for name, default, description in model.describe():
            shown = f"`{default}`" if default else "(unset)"
            lines.append(f"| `{name}` | {_cell(shown)} | {_cell(description)} |")
    lines.append(END)
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    start, end = readme.index(START), readme.index(END) + len(END)
    return readme[start:end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="replace the table in this README")
    args = parser.parse_args()
    table = render()
    if args.write is None:
        print(table)
        return
    readme = args.write.read_text()
    args.write.write_text(readme.replace(readme_table(readme), table))


if __name__ == "__main__":
    main()
