"""The README is the user's manual: its first commands and its option table must match the daemon."""

import re
from pathlib import Path

from fwd.settings import SETTINGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def option_table() -> str:
    start = README.index("| option | env | default | meaning |")
    return README[start : README.index("\n\n", start)]


def test_every_option_and_its_environment_names_are_in_the_option_table():
    table = option_table()
    for setting in SETTINGS:
        assert f"`--{setting.name}" in table, setting.name
        for env in setting.envs:
            assert f"`{env}`" in table, env
    assert "`--config FILE`" in table


def test_the_table_lists_no_option_the_daemon_lacks():
    names = {s.name for s in SETTINGS} | {"config"}
    listed = set(re.findall(r"^\| `--([a-z-]+)", option_table(), re.MULTILINE))
    assert listed == names


def test_the_readme_opens_with_the_run_command_and_the_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    assert "pip install ." in blocks[0] and "twistd -n openai-forward" in blocks[0]
    assert 'pip install ".[test]"' in blocks[1] and "python -m pytest" in blocks[1]


def test_every_toml_example_is_a_configuration_the_daemon_accepts(tmp_path):
    from fwd import config

    blocks = re.findall(r"```toml\n(.*?)```", README, re.DOTALL)
    assert len(blocks) >= 2
    for number, block in enumerate(blocks):
        path = tmp_path / f"example{number}.toml"
        path.write_text(block)
        loaded = config.load({}, environ={}, dotenv_path=None, config_file=str(path))
        assert loaded.routes, block
