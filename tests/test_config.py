"""Configuration as the operator sees it: where each setting comes from, what is refused, what is printed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwd import config
from fwd import settings as fwd_settings
from fwd.config import ConfigError, ForwardKey, load

POOL = "sk-pool-aaaaaaaaaaaaaaaa1111"
POOL2 = "sk-pool-bbbbbbbbbbbbbbbb2222"
FK = "fk-alice-cccccccccccccccc3333"
FK2 = "fk-bob-dddddddddddddddd4444"
PROXY = "proxy-eeeeeeeeeeeeeeee5555"


@pytest.fixture
def files(tmp_path):
    """Write a .env and a TOML config file; return a loader that uses them."""

    class Files:
        dotenv = tmp_path / ".env"
        toml = tmp_path / "fwd.toml"

        def load(self, cli=None, env=None, dotenv=None, toml=None):
            if dotenv is not None:
                self.dotenv.write_text(dotenv)
            if toml is not None:
                self.toml.write_text(toml)
            return load(
                cli or {},
                environ=env or {},
                dotenv_path=str(self.dotenv),
                config_file=str(self.toml) if toml is not None else None,
            )

    return Files()


def refused(**kw):
    """The one-line ConfigError message load() gives for these sources."""
    with pytest.raises(ConfigError) as caught:
        load(kw.get("cli", {}), environ=kw.get("env", {}), dotenv_path=None, config_file=kw.get("config_file"))
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    return message


# Precedence -------------------------------------------------------------------------------------------------

SOURCES = {
    "cli": {"cli": {"timeout": "2"}},
    "env": {"env": {"TIMEOUT": "3"}},
    "dotenv": {"dotenv": "TIMEOUT=4\n"},
    "file": {"toml": "timeout = 5\n"},
}


@pytest.mark.parametrize(
    "present, expected",
    [
        (("cli", "env", "dotenv", "file"), 2.0),
        (("env", "dotenv", "file"), 3.0),
        (("dotenv", "file"), 4.0),
        (("file",), 5.0),
        ((), 600.0),
    ],
)
def test_a_setting_comes_from_cli_then_env_then_dotenv_then_config_file_then_default(files, present, expected):
    kw = {}
    for name in present:
        kw.update(SOURCES[name])
    assert files.load(**kw).timeout == expected


def test_an_empty_environment_variable_does_not_hide_the_dotenv_value(files):
    assert files.load(env={"TIMEOUT": ""}, dotenv="TIMEOUT=4").timeout == 4.0


def test_a_bad_value_in_dotenv_is_reported_as_coming_from_dotenv(files):
    with pytest.raises(ConfigError, match=r"^TIMEOUT in \.env='soon'"):
        files.load(dotenv="TIMEOUT=soon\n")


def test_dotenv_understands_comments_export_and_quotes():
    parsed = fwd_settings.read_dotenv(
        "# a comment\n"
        "export OPENAI_BASE_URL=http://up:8080\n"
        "OPENAI_API_KEY='sk-a sk-b'\n"
        'LOG_DIR="/var/log/fwd"\n'
        "TIMEOUT=30 # seconds\n"
        "not a setting line\n"
    )
    assert parsed == {
        "OPENAI_BASE_URL": "http://up:8080",
        "OPENAI_API_KEY": "sk-a sk-b",
        "LOG_DIR": "/var/log/fwd",
        "TIMEOUT": "30",
    }


# Ports, URLs and aliases ------------------------------------------------------------------------------------


def test_port_8000_means_tcp_8000():
    assert load({}, environ={"PORT": "8000"}, dotenv_path=None).ports == ("tcp:8000",)


def test_the_default_is_to_listen_on_tcp_8000():
    assert load({}, environ={}, dotenv_path=None).ports == ("tcp:8000",)


def test_several_ports_are_all_listened_on():
    env = {"PORT": "8000, unix:/run/fwd.sock ssl:8443:privateKey=k.pem:certKey=c.pem"}
    assert load({}, environ=env, dotenv_path=None).ports == (
        "tcp:8000",
        "unix:/run/fwd.sock",
        "ssl:8443:privateKey=k.pem:certKey=c.pem",
    )
    assert load({"port": ["9000", "tcp6:9001"]}, environ=env, dotenv_path=None).ports == ("tcp:9000", "tcp6:9001")


def test_the_oxy_names_still_work():
    cfg = load(
        {},
        environ={"OXY_TARGET": "http://legacy:1234/", "OXY_PORT": "7000", "OXY_HOP_HEADER_PREFIX": "X-SCF-"},
        dotenv_path=None,
    )
    assert cfg.routes[0].base_url == "http://legacy:1234"
    assert cfg.ports == ("tcp:7000",)
    assert cfg.hop_header_prefix == "x-scf-"


def test_the_current_name_wins_over_the_oxy_alias():
    cfg = load({}, environ={"PORT": "8001", "OXY_PORT": "7000"}, dotenv_path=None)
    assert cfg.ports == ("tcp:8001",)


@pytest.mark.parametrize(
    "sources, named",
    [
        ({"cli": {"port": ["tcp:notaport"]}}, "--port"),
        ({"env": {"PORT": "70000"}}, "PORT"),
        ({"env": {"PORT": "\u00b2"}}, "PORT"),  # a digit to str.isdigit(), not to int()
        ({"env": {"PORT": "unix:"}}, "PORT"),
        ({"env": {"OPENAI_BASE_URL": "not a url"}}, "OPENAI_BASE_URL"),
        ({"env": {"OPENAI_BASE_URL": "ftp://example.com"}}, "OPENAI_BASE_URL"),
        ({"env": {"OPENAI_BASE_URL": "http://[::1"}}, "OPENAI_BASE_URL"),
        ({"env": {"OPENAI_BASE_URL": "http://exa\tmple.com"}}, "OPENAI_BASE_URL"),
        ({"env": {"OPENAI_BASE_URL": "http://example.com:99999"}}, "OPENAI_BASE_URL"),
        ({"env": {"OPENAI_BASE_URL": "http://example.com/?a=1"}}, "OPENAI_BASE_URL"),
        ({"env": {"OXY_TARGET": "nowhere"}}, "OXY_TARGET"),
        ({"env": {"TIMEOUT": "soon"}}, "TIMEOUT"),
        ({"env": {"TIMEOUT": "-1"}}, "TIMEOUT"),
        ({"env": {"IDLE_TIMEOUT": "inf"}}, "IDLE_TIMEOUT"),
        ({"env": {"MAX_BODY_SIZE": "lots"}}, "MAX_BODY_SIZE"),
        ({"env": {"MAX_BODY_SIZE": "inf"}}, "MAX_BODY_SIZE"),
        ({"env": {"MAX_BODY_SIZE": "1e400"}}, "MAX_BODY_SIZE"),
        ({"env": {"WORKERS": "0"}}, "WORKERS"),
        ({"env": {"LOG_CHAT": "maybe"}}, "LOG_CHAT"),
        ({"env": {"IP_WHITELIST": "10.0.0.0/99"}}, "IP_WHITELIST"),
        ({"env": {"ROUTE_PREFIX": "/a/../b"}}, "ROUTE_PREFIX"),
        ({"env": {"METRICS_PORT": "tcp:x"}}, "METRICS_PORT"),
    ],
)
def test_a_bad_value_stops_startup_with_one_line_naming_the_setting(sources, named):
    assert named in refused(**sources)


def test_sizes_accept_k_m_g_suffixes():
    assert load({}, environ={"MAX_BODY_SIZE": "10M"}, dotenv_path=None).max_body_size == 10 * 1024 * 1024
    assert load({}, environ={"MAX_BODY_SIZE": "512kb"}, dotenv_path=None).max_body_size == 512 * 1024
    assert load({}, environ={"MAX_BODY_SIZE": "1000"}, dotenv_path=None).max_body_size == 1000


def test_a_route_prefix_is_normalised_to_a_leading_slash_and_no_trailing_one():
    assert load({}, environ={"ROUTE_PREFIX": "openai/"}, dotenv_path=None).routes[0].prefix == "/openai"


# Keys -------------------------------------------------------------------------------------------------------


def test_keys_are_split_on_spaces_and_commas():
    env = {"OPENAI_API_KEY": f" {POOL}, {POOL2},sk-third-key\tsk-fourth-key ", "FORWARD_KEY": f"{FK},{FK2}"}
    route = load({}, environ=env, dotenv_path=None).routes[0]
    assert route.api_keys == (POOL, POOL2, "sk-third-key", "sk-fourth-key")
    assert [f.key for f in route.forward_keys] == [FK, FK2]


def test_forward_key_without_an_upstream_key_is_refused():
    message = refused(env={"FORWARD_KEY": FK})
    assert "FORWARD_KEY" in message and FK not in message


def test_forward_keys_must_start_with_fk():
    message = refused(env={"OPENAI_API_KEY": POOL, "FORWARD_KEY": "sk-not-a-forward-key"})
    assert "'fk-'" in message and "sk-not-a-forward-key" not in message


def test_a_key_containing_a_colon_is_refused_without_showing_it():
    message = refused(env={"OPENAI_API_KEY": "sk-abc:defghijkl"})
    assert "':'" in message and "defghijkl" not in message


def test_a_forward_key_listed_twice_is_refused():
    assert "twice" in refused(env={"OPENAI_API_KEY": POOL, "FORWARD_KEY": f"{FK} {FK}"})


def test_client_keys_can_be_forbidden():
    env = {"OPENAI_API_KEY": POOL, "FORWARD_KEY": FK, "ALLOW_CLIENT_KEYS": "false"}
    assert load({}, environ=env, dotenv_path=None).routes[0].allow_client_keys is False


def test_the_config_repr_never_shows_a_key():
    env = {"OPENAI_API_KEY": POOL, "FORWARD_KEY": FK, "PROXY_KEY": PROXY}
    text = repr(load({}, environ=env, dotenv_path=None))
    assert POOL not in text and FK not in text and PROXY not in text


# The --config file ------------------------------------------------------------------------------------------

ROUTES_TOML = f"""
timeout = 20

[[route]]
prefix = "/openai"
base_url = "https://api.openai.com"
api_keys = ["{POOL}", "{POOL2}"]
forward_keys = ["{FK}", {{ key = "{FK2}", name = "bob", models = ["gpt-4o-mini"] }}]

[[route]]
prefix = "/azure/"
base_url = "https://me.openai.azure.com/"
kind = "azure"
api_keys = "{POOL}"

[[route]]
prefix = "/local"
base_url = "http://127.0.0.1:11434"
kind = "general"
allow_client_keys = false
"""


def test_config_file_route_tables_become_the_routes(files):
    cfg = files.load(toml=ROUTES_TOML)
    openai, azure, local = cfg.routes
    assert (openai.prefix, openai.base_url, openai.kind) == ("/openai", "https://api.openai.com", "openai")
    assert openai.api_keys == (POOL, POOL2)
    alice, bob = openai.forward_keys
    assert alice.key == FK and alice.name == fwd_settings.mask(FK) and alice.models is None
    assert bob == ForwardKey(FK2, "bob", frozenset({"gpt-4o-mini"}))
    assert bob.allows("gpt-4o-mini") and not bob.allows("gpt-4o") and not bob.allows(None)
    assert (azure.prefix, azure.base_url, azure.kind, azure.api_keys) == (
        "/azure",
        "https://me.openai.azure.com",
        "azure",
        (POOL,),
    )
    assert (local.kind, local.api_keys, local.allow_client_keys) == ("general", (), False)
    assert cfg.timeout == 20.0


def test_single_route_settings_are_ignored_with_a_note_when_the_file_has_routes(files):
    cfg = files.load(env={"OPENAI_BASE_URL": "http://elsewhere"}, toml=ROUTES_TOML)
    assert [r.prefix for r in cfg.routes] == ["/openai", "/azure", "/local"]
    assert "note: OPENAI_BASE_URL is ignored because --config has [[route]] tables" in list(config.describe(cfg))


def test_a_config_file_without_routes_feeds_the_single_route(files):
    cfg = files.load(toml=f'base_url = "http://up:9"\napi_key = ["{POOL}"]\nport = [8001, "unix:/s"]\n')
    assert cfg.routes[0].base_url == "http://up:9" and cfg.routes[0].api_keys == (POOL,)
    assert cfg.ports == ("tcp:8001", "unix:/s")


ROUTE = '[[route]]\nbase_url = "http://up"\n'


@pytest.mark.parametrize(
    "toml, says",
    [
        (ROUTE + 'prefix = "/a"\n' + ROUTE + 'prefix = "a/"\n', "two routes have the prefix '/a'"),
        (ROUTE + ROUTE, "two routes have the prefix '/'"),
        (ROUTE + 'bse_url = "typo"\n', "unknown field 'bse_url'"),
        ('tmeout = 3\n' + ROUTE, "unknown setting 'tmeout'"),
        ('[[route]]\nprefix = "/x"\n', "base_url is missing"),
        (ROUTE + 'kind = "anthropic"\n', "must be one of openai, azure, general"),
        (ROUTE + f'api_keys = ["{POOL}"]\nforward_keys = [{{ key = "{FK}", nick = "x" }}]\n', "forward key 1"),
        (ROUTE + f'api_keys = ["{POOL}"]\nforward_keys = [{{ key = "{FK}", models = "gpt-4o" }}]\n', "models"),
        (ROUTE + f'api_keys = ["{POOL}"]\nforward_keys = ["{FK} {FK2}"]\n', "forward key 1"),
        (ROUTE + f'api_keys = ["{POOL}"]\nforward_keys = [""]\n', "forward key 1"),
        (ROUTE + f'api_keys = ["{POOL}"]\nforward_keys = [{{ key = "" }}]\n', "forward key 1"),
        (ROUTE + 'allow_client_keys = "no"\n', "allow_client_keys"),
        ("[route]\nbase_url = 'http://up'\n", "array of tables"),
        ("route = []\n", "at least one [[route]]"),
        ("this is = not toml = at all\n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_refused_with_one_line(files, toml, says):
    with pytest.raises(ConfigError) as caught:
        files.load(toml=toml)
    message = str(caught.value)
    assert says in message and len(message.splitlines()) == 1
    assert FK not in message and FK2 not in message and POOL not in message


def test_a_missing_config_file_is_refused(tmp_path):
    message = refused(config_file=str(tmp_path / "absent.toml"))
    assert "cannot read it" in message


# What startup prints ----------------------------------------------------------------------------------------


def test_no_auth_mode_is_announced_with_a_loud_warning():
    cfg = load({}, environ={"OPENAI_API_KEY": POOL}, dotenv_path=None)
    lines = list(config.describe(cfg))
    assert any(line.startswith("WARNING: route / has pool keys but no FORWARD_KEY") for line in lines)


def test_no_warning_when_forward_keys_guard_the_pool():
    cfg = load({}, environ={"OPENAI_API_KEY": POOL, "FORWARD_KEY": FK}, dotenv_path=None)
    lines = list(config.describe(cfg))
    assert lines == ["route / -> https://api.openai.com (openai; 1 pool keys, 1 forward keys)"]


def test_a_route_without_pool_keys_says_client_keys_pass_through():
    lines = list(config.describe(load({}, environ={}, dotenv_path=None)))
    assert lines == ["route / -> https://api.openai.com (openai; client keys pass through)"]


def test_describe_never_shows_a_key(files):
    env = {"OPENAI_API_KEY": f"{POOL} {POOL2}", "PROXY_KEY": PROXY}
    for cfg in (load({}, environ=env, dotenv_path=None), files.load(env=env, toml=ROUTES_TOML)):
        text = "\n".join(config.describe(cfg))
        for secret in (POOL, POOL2, FK, FK2, PROXY):
            assert secret not in text


def test_mask_shows_only_the_kind_of_key_and_its_last_four_characters():
    assert fwd_settings.mask("sk-proj-abcdefghijklmnop") == "sk-…mnop"
    assert fwd_settings.mask("fk-abcdefghijklmnop") == "fk-…mnop"
    assert fwd_settings.mask("az0123456789abcdef") == "…cdef"
    assert fwd_settings.mask("sk-short") == "***"


# Properties -------------------------------------------------------------------------------------------------


@given(st.text())
def test_read_dotenv_never_crashes_on_any_text(text):
    parsed = fwd_settings.read_dotenv(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())


@given(st.text())
def test_split_list_never_crashes_and_yields_only_nonempty_separator_free_items(text):
    for item in fwd_settings.split_list(text):
        assert item and "," not in item and not any(c.isspace() for c in item)


ENV_NAMES = sorted({name for s in fwd_settings.SETTINGS for name in s.envs})
SECRET_ENVS = ("OPENAI_API_KEY", "FORWARD_KEY", "PROXY_KEY")


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(ENV_NAMES), st.text(max_size=40)))
def test_any_environment_gives_a_config_or_one_clear_line(environ):
    try:
        cfg = load({}, environ=environ, dotenv_path=None)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1
    else:
        assert isinstance(cfg, config.Config)


secret_token = st.builds(
    lambda prefix, body: prefix + body,
    st.sampled_from(["sk-", "fk-", "", "pk-"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_", min_size=8, max_size=24),
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.sampled_from([n for n in ENV_NAMES if n not in SECRET_ENVS]), st.text(max_size=30)),
    st.dictionaries(
        st.sampled_from(SECRET_ENVS),
        st.lists(secret_token, min_size=1, max_size=3).map(lambda keys: ",".join(keys)),
    ),
)
def test_a_refused_configuration_never_prints_a_key(plain, secrets):
    try:
        load({}, environ={**plain, **secrets}, dotenv_path=None)
    except ConfigError as e:
        message = str(e)
        assert len(message.splitlines()) == 1
        for value in secrets.values():
            for key in fwd_settings.split_list(value):
                if not any(key in other for other in plain.values()):
                    assert key not in message


# Several upstreams per route -----------------------------------------------------------------------------------

UPSTREAMS = """
[[route]]
forward_keys = [{ key = "fk-team-0000000000000000001", name = "team" }]
[[route.upstream]]
base_url = "https://api.openai.com"
api_keys = ["sk-openai-00000000000000001"]
weight = 3
[[route.upstream]]
base_url = "https://westeu.openai.azure.com"
kind = "azure"
api_keys = ["azure-key-000000000000000001"]
api_version = "2024-10-21"
deployments = { "gpt-4o" = "my-gpt4o" }
"""


def test_a_route_lists_upstreams_each_with_its_own_pool_and_weight(files):
    route = files.load(toml=UPSTREAMS).routes[0]
    first, second = route.upstreams
    assert (first.base_url, first.kind, first.weight, first.served) == ("https://api.openai.com", "openai", 3.0, None)
    assert (second.kind, second.deployments, second.api_version) == ("azure", {"gpt-4o": "my-gpt4o"}, "2024-10-21")
    assert second.served == frozenset({"gpt-4o"}) and second.serves("gpt-4o") and not second.serves("gpt-4o-mini")
    assert set(route.api_keys) == {"sk-openai-00000000000000001", "azure-key-000000000000000001"}
    assert route.reads_model and route.base_url == "https://api.openai.com"
    assert not route.allow_client_keys, "a client's own key would reach every upstream"


def test_a_route_with_one_base_url_has_that_one_upstream(files):
    route = files.load(cli={"base_url": "https://example.test/v", "api_key": "sk-one-000000000000000001"}).routes[0]
    (only,) = route.upstreams
    assert (only.base_url, only.api_keys, only.weight) == ("https://example.test/v", ("sk-one-000000000000000001",), 1.0)
    assert not route.reads_model


@pytest.mark.parametrize("change,message", [
    (('kind = "azure"\n', 'kind = "azure"\nbogus = 1\n'), "unknown field 'bogus'"),
    (('api_version = "2024-10-21"\n', ''), "needs an api_version"),
    (('api_keys = ["azure-key-000000000000000001"]\n', ''), "either every upstream has api_keys or none has"),
    (("[[route]]\n", "[[route]]\nallow_client_keys = true\n"), "forward keys only"),
    (('kind = "azure"\n', ''), 'deployments are for kind = "azure"'),
    (("weight = 3", "weight = 0"), "weight must be a number above 0"),
    (("https://westeu.openai.azure.com", "https://api.openai.com"), "two upstreams have the same base_url"),
    (("[[route]]\n", '[[route]]\nbase_url = "https://x.test"\n'), "not both"),
    (('{ "gpt-4o" = "my-gpt4o" }', '{ "gpt-4o" = "../x" }'), "deployments must be a table"),
])
def test_bad_upstream_tables_are_refused_in_one_line(files, change, message):
    with pytest.raises(ConfigError) as caught:
        files.load(toml=UPSTREAMS.replace(*change))
    assert message in str(caught.value) and "sk-openai" not in str(caught.value)


def test_workers_auto_is_one_per_core_this_process_may_use():
    import os

    from fwd.settings import Raw, parse_workers

    assert parse_workers(Raw("auto", "WORKERS")) == len(os.sched_getaffinity(0))
    assert parse_workers(Raw("AUTO", "WORKERS"), cores=6) == 6
    assert parse_workers(Raw("3", "WORKERS")) == 3
    for bad in ("0", "many", ""):
        with pytest.raises(ConfigError):
            parse_workers(Raw(bad, "WORKERS"))
