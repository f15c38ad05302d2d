"""The `openai-forward` command: `run` (the seeds' command line, in the foreground), `usage` and `convert`.  Tests: tests/test_cli.py"""

from __future__ import annotations

import sys

from fwd.settings import SETTING_BY_KEY

USAGE = """usage: openai-forward run [--port=8000] [--base_url=URL] [--api_key=KEYS] [--forward_key=KEYS] ...
       openai-forward usage [--days N | --since DAY] [--by day,caller,route,model] [--caller NAME] [--json]
       openai-forward convert [SRC [DST]]

run      start the daemon in the foreground (the same as `twistd -n openai-forward ...`); every option of
         `twistd openai-forward --help` is accepted with dashes or underscores, as --name=value or --name value
usage    tokens, requests and cost by caller, model and day, from the usage ledger in DATA_DIR
convert  turn an openai-forward chat.log (default ./Log/chat.log) into JSONL (default ./Log/chat.jsonl)
"""

FLAGS_WITH_VALUES = {"log_chat"}


def run_arguments(argv: list[str]) -> list[str]:
    """Translate the seeds' `--name=value` options into the twistd plugin's `--name value` options."""
    out = []
    items = list(argv)
    while items:
        item = items.pop(0)
        if not item.startswith("--"):
            raise SystemExit(f"openai-forward run: unexpected argument {item!r}")
        name, sep, value = item[2:].partition("=")
        key = name.replace("-", "_")
        if key not in SETTING_BY_KEY and key not in ("listen", "config"):
            raise SystemExit(f"openai-forward run: unknown option --{name}; see `twistd openai-forward --help`")
        if not sep:
            if key in FLAGS_WITH_VALUES and (not items or items[0].startswith("--")):
                value = "true"
            elif not items:
                raise SystemExit(f"openai-forward run: --{name} needs a value")
            else:
                value = items.pop(0)
        if key in FLAGS_WITH_VALUES:
            if value.strip().lower() in ("1", "true", "yes", "on"):
                out.append("--log-chat")
            continue
        out += ["--" + key.replace("_", "-"), value]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        from twisted.scripts import twistd

        sys.argv = ["twistd", "--nodaemon", "--pidfile=", "openai-forward", *run_arguments(rest)]
        twistd.run()
        return 0
    if command == "usage":
        from fwd.usage_report import main_usage

        return main_usage(rest)
    if command == "convert":
        from fwd.convert import main_convert

        return main_convert(rest)
    sys.stderr.write(f"openai-forward: unknown command {command!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
