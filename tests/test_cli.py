"""`openai-forward run` takes the seeds' command line and hands the twistd plugin the same settings."""

import pytest

from fwd import config, settings, tap
from fwd.cli import run_arguments


def plugin_settings(monkeypatch, argv):
    """What the twistd plugin's options read the configuration from for this `openai-forward run` command line."""
    seen = {}

    def fake_read(cli, config_file=None, **kw):
        seen.update(cli, config_file=config_file)
        return "sources"

    monkeypatch.setattr(settings, "read_sources", fake_read)
    monkeypatch.setattr(config, "from_sources", lambda sources: "loaded" if sources == "sources" else None)
    options = tap.Options()
    options.parseOptions(run_arguments(argv))
    assert options.config == "loaded"
    return seen


def test_the_seeds_command_line_becomes_plugin_options():
    argv = ["--port=9999", "--base_url=http://x", "--log_chat=true", "--api_key", "sk-a"]
    assert run_arguments(argv) == ["--port", "9999", "--base-url", "http://x", "--log-chat", "--api-key", "sk-a"]


def test_the_plugin_accepts_what_run_hands_it(monkeypatch):
    argv = ["--port=9999", "--base_url=http://x", "--log_chat=true", "--api_key", "sk-a", "--listen", "unix:/s",
            "--forward-key=fk-b", "--config", "fwd.toml"]
    seen = plugin_settings(monkeypatch, argv)
    assert seen["port"] == ["9999", "unix:/s"]
    assert (seen["base_url"], seen["api_key"], seen["forward_key"]) == ("http://x", "sk-a", "fk-b")
    assert seen["log_chat"] is True and seen["config_file"] == "fwd.toml"


@pytest.mark.parametrize(
    "argv, chat",
    [
        (["--log_chat"], ["--log-chat"]),
        (["--log_chat", "--port=1"], ["--log-chat", "--port", "1"]),
        (["--log_chat", "yes"], ["--log-chat"]),
        (["--log_chat=false"], []),
        (["--log-chat", "0"], []),
    ],
)
def test_log_chat_is_a_flag_that_also_takes_true_or_false(argv, chat):
    assert run_arguments(argv) == chat


def test_an_unknown_option_exits_with_a_message_naming_it():
    with pytest.raises(SystemExit) as caught:
        run_arguments(["--port=9999", "--bse_url=http://x"])
    assert "unknown option --bse_url" in str(caught.value.code)


def test_an_option_without_its_value_exits_with_a_message():
    with pytest.raises(SystemExit) as caught:
        run_arguments(["--api_key"])
    assert "--api_key needs a value" in str(caught.value.code)


def test_a_stray_argument_exits_with_a_message():
    with pytest.raises(SystemExit) as caught:
        run_arguments(["9999"])
    assert "unexpected argument '9999'" in str(caught.value.code)
