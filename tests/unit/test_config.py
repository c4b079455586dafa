"""Settings: defaults, APIKEYS_* environment variables, then explicit overrides."""

from dataclasses import FrozenInstanceError, fields
from datetime import timedelta
from pathlib import Path

import pytest

from apikeys_server.config import (
    ConsoleSettings,
    InvalidSetting,
    Settings,
    SettingsConflict,
    describe,
    is_loopback,
    rule_of,
    variable_of,
)

# Settings that must come with others to be valid (each is allowed, but not alone).
COMPANIONS = {
    "tls_cert_file": {"APIKEYS_TLS_KEY_FILE": "/tmp/key.pem"},
    "tls_key_file": {"APIKEYS_TLS_CERT_FILE": "/tmp/cert.pem"},
    "tls_client_ca_file": {
        "APIKEYS_TLS_CERT_FILE": "/tmp/cert.pem",
        "APIKEYS_TLS_KEY_FILE": "/tmp/key.pem",
    },
}
STRING_SAMPLES = {
    "database_url": "postgresql://db/x",
    "listen": "[::1]:9",
    "key_prefix": "wc_live",
    "log_level": "debug",
    "max_staleness_seconds": "20",  # its low end would be below the feed poll
    "ext_authz_key_header": "x-gateway-key",
    "log_format": "json",
    "metrics_listen": "127.0.0.1:9464",
}


def sample(name: str) -> str:
    """A valid value other than the default, from the field's own rule."""
    item = next(item for item in fields(Settings) if item.name == name)
    rule = rule_of(item)
    if name in STRING_SAMPLES:
        return STRING_SAMPLES[name]
    if item.type is bool:
        return "0" if item.default else "1"
    if rule.low is not None and rule.high is not None:
        default = item.default
        seconds = default.total_seconds() if isinstance(default, timedelta) else default
        return str(rule.low if rule.low != seconds else rule.high)
    return "/tmp/x"


class TestDefaults:
    def test_empty_environment_gives_defaults(self) -> None:
        """No variables: every field has its default."""
        assert Settings.from_env({}) == Settings()

    def test_default_values(self) -> None:
        """The defaults a bare `apikeys-server serve` runs with."""
        settings = Settings()
        assert settings.key_prefix == "ak"
        assert settings.database_url == "sqlite:///apikeys.db"
        assert settings.scopes_file is None
        assert settings.migrate_on_start is True
        assert settings.max_rotation_overlap == timedelta(days=30)

    def test_settings_are_frozen(self) -> None:
        """Settings cannot be changed after start-up."""
        settings = Settings()
        with pytest.raises(FrozenInstanceError):
            settings.workers = 2  # type: ignore[misc]

    def test_unrelated_variables_are_ignored(self) -> None:
        """Only APIKEYS_-prefixed, upper-case variables are read."""
        env = {"WORKERS": "2", "apikeys_workers": "3", "APIKEYS_UNKNOWN": "x", "PATH": "/bin"}
        assert Settings.from_env(env) == Settings()


class TestEnvironment:
    def test_strings(self) -> None:
        """String fields are taken as-is."""
        env = {
            "APIKEYS_DATABASE_URL": "postgresql+psycopg://db/apikeys",
            "APIKEYS_LISTEN": "0.0.0.0:9000",
            "APIKEYS_KEY_PREFIX": "wc_live",
            "APIKEYS_LOG_LEVEL": "DEBUG",
        }
        settings = Settings.from_env(env)
        assert settings.database_url == "postgresql+psycopg://db/apikeys"
        assert settings.listen == "0.0.0.0:9000"
        assert settings.key_prefix == "wc_live"
        assert settings.log_level == "DEBUG"

    def test_ints(self) -> None:
        """Integer fields are parsed as int."""
        settings = Settings.from_env({"APIKEYS_WORKERS": "4", "APIKEYS_CACHE_SIZE": "0"})
        assert settings.workers == 4
        assert settings.cache_size == 0

    def test_floats(self) -> None:
        """Float fields accept integers and decimals."""
        settings = Settings.from_env(
            {"APIKEYS_CACHE_TTL_SECONDS": "2.5", "APIKEYS_LAST_USED_FLUSH_SECONDS": "1"}
        )
        assert settings.cache_ttl_seconds == 2.5
        assert settings.last_used_flush_seconds == 1.0

    @pytest.mark.parametrize(
        ("raw", "value"),
        [
            ("1", True),
            ("true", True),
            ("TRUE", True),
            (" yes ", True),
            ("on", True),
            ("0", False),
            ("false", False),
            ("no", False),
            ("off", False),
        ],
    )
    def test_bools(self, raw: str, value: bool) -> None:
        """Booleans accept 1/true/yes/on (any case) as true and 0/false/no/off as false."""
        assert Settings.from_env({"APIKEYS_MIGRATE_ON_START": raw}).migrate_on_start is value

    @pytest.mark.parametrize("raw", ["maybe", "2", "enabled", "y", "-1"])
    def test_other_bool_spellings_are_refused(self, raw: str) -> None:
        """Anything else is an error listing the accepted spellings, not a silent false."""
        with pytest.raises(ValueError, match="APIKEYS_MIGRATE_ON_START=") as caught:
            Settings.from_env({"APIKEYS_MIGRATE_ON_START": raw})
        assert str(caught.value).endswith("one of true, false, 1, 0, yes, no, on, off")

    def test_timedelta_in_seconds(self) -> None:
        """Durations are given in seconds."""
        settings = Settings.from_env({"APIKEYS_MAX_ROTATION_OVERLAP": "3600"})
        assert settings.max_rotation_overlap == timedelta(hours=1)

    def test_scopes_file_is_a_path(self) -> None:
        """The scopes file becomes a Path."""
        settings = Settings.from_env({"APIKEYS_SCOPES_FILE": "/etc/apikeys/scopes.toml"})
        assert settings.scopes_file == Path("/etc/apikeys/scopes.toml")

    def test_empty_value_means_default(self) -> None:
        """An empty variable is treated as unset, not as an invalid value."""
        settings = Settings.from_env({"APIKEYS_WORKERS": "", "APIKEYS_KEY_PREFIX": ""})
        assert settings == Settings()

    def test_every_field_has_a_variable(self) -> None:
        """Each field can be set from APIKEYS_<FIELD> (none is silently unreadable)."""
        for item in fields(Settings):
            env = {variable_of(item.name): sample(item.name), **COMPANIONS.get(item.name, {})}
            settings = Settings.from_env(env)
            assert getattr(settings, item.name) != getattr(Settings(), item.name), item.name

    @pytest.mark.parametrize(
        ("name", "raw"),
        [
            ("APIKEYS_WORKERS", "many"),
            ("APIKEYS_WORKERS", "1.5"),
            ("APIKEYS_CACHE_SIZE", "10k"),
            ("APIKEYS_CACHE_TTL_SECONDS", "soon"),
            ("APIKEYS_MAX_ROTATION_OVERLAP", "30d"),
        ],
    )
    def test_bad_numbers_name_the_variable(self, name: str, raw: str) -> None:
        """A value that does not parse raises ValueError naming the variable and the value."""
        with pytest.raises(ValueError, match=name) as caught:
            Settings.from_env({name: raw})
        assert repr(raw) in str(caught.value)


class TestOverrides:
    def test_overrides_beat_environment(self) -> None:
        """Explicit overrides (command-line flags) win over the environment."""
        env = {"APIKEYS_LISTEN": "0.0.0.0:9000", "APIKEYS_WORKERS": "4"}
        settings = Settings.from_env(env, listen="127.0.0.1:1", workers=2)
        assert settings.listen == "127.0.0.1:1"
        assert settings.workers == 2

    def test_none_overrides_are_ignored(self) -> None:
        """A None override (flag not given) leaves the environment or default value."""
        env = {"APIKEYS_LISTEN": "0.0.0.0:9000"}
        settings = Settings.from_env(env, listen=None, workers=None, scopes_file=None)
        assert settings.listen == "0.0.0.0:9000"
        assert settings.workers == Settings().workers

    def test_falsy_overrides_are_applied(self) -> None:
        """Zero and False are real values, applied as given."""
        settings = Settings.from_env({}, cache_size=0, migrate_on_start=False)
        assert settings.cache_size == 0
        assert settings.migrate_on_start is False

    def test_unknown_override_is_an_error(self) -> None:
        """An override naming no field is a programming error, raised at once."""
        with pytest.raises(TypeError):
            Settings.from_env({}, no_such_setting=1)


class TestDatabaseBounds:
    def test_defaults_bound_verify_lookups_to_two_seconds(self) -> None:
        """A lost database answers a Verify lookup within about 2 s by default."""
        settings = Settings()
        assert settings.db_connect_timeout_seconds <= 2
        assert settings.db_read_timeout_seconds <= 2
        assert settings.db_write_timeout_seconds == 5
        assert settings.db_pool_timeout_seconds <= 2
        assert settings.db_watchdog is True

    @pytest.mark.parametrize(
        "name",
        [
            "APIKEYS_DB_CONNECT_TIMEOUT_SECONDS",
            "APIKEYS_DB_READ_TIMEOUT_SECONDS",
            "APIKEYS_DB_WRITE_TIMEOUT_SECONDS",
            "APIKEYS_DB_POOL_TIMEOUT_SECONDS",
        ],
    )
    @pytest.mark.parametrize("raw", ["0", "-1", "inf", "nan"])
    def test_bounds_must_be_positive_seconds(self, name: str, raw: str) -> None:
        """Zero (no bound at all in libpq), negative, infinite or NaN bounds are refused."""
        with pytest.raises(ValueError, match=name):
            Settings.from_env({name: raw})


class TestProcesses:
    @pytest.mark.parametrize("raw", ["0", "65", "-1"])
    def test_out_of_range_names_flag_variable_and_range(self, raw: str) -> None:
        """processes outside 1..64 is refused with both ways to set it and the range."""
        with pytest.raises(ValueError) as caught:
            Settings.from_env({"APIKEYS_PROCESSES": raw})
        message = f"APIKEYS_PROCESSES={raw} (or --processes) must be between 1 and 64"
        assert str(caught.value) == message

    def test_port_zero_needs_one_process(self) -> None:
        """Each process would bind a port of its own: refused."""
        with pytest.raises(ValueError, match="each of the 2 processes"):
            Settings.from_env({}, listen="127.0.0.1:0", processes=2)
        assert Settings.from_env({}, listen="127.0.0.1:0").processes == 1


# variable, value, the whole message (None: only that it is refused and named).
OUT_OF_RANGE = [
    # The user reports.
    ("APIKEYS_CACHE_TTL_SECONDS", "-1", "must be between 0 and 86400 (seconds)"),
    ("APIKEYS_CACHE_SIZE", "-5", "must be between 0 and 10000000"),
    ("APIKEYS_LAST_USED_FLUSH_SECONDS", "0", "must be between 0.01 and 86400 (seconds)"),
    # One beyond each end of every numeric rule.
    ("APIKEYS_WORKERS", "0", "must be between 1 and 1024"),
    ("APIKEYS_WORKERS", "1025", "must be between 1 and 1024"),
    ("APIKEYS_PROCESSES", "0", "must be between 1 and 64"),
    ("APIKEYS_CACHE_SIZE", "10000001", "must be between 0 and 10000000"),
    ("APIKEYS_CACHE_TTL_SECONDS", "86401", "must be between 0 and 86400 (seconds)"),
    ("APIKEYS_NEGATIVE_CACHE_SIZE", "-1", "must be between 0 and 10000000"),
    ("APIKEYS_NEGATIVE_CACHE_TTL_SECONDS", "-0.5", "must be between 0 and 86400 (seconds)"),
    ("APIKEYS_NEGATIVE_CACHE_TTL_SECONDS", "inf", "must be between 0 and 86400 (seconds)"),
    ("APIKEYS_LAST_USED_FLUSH_SECONDS", "86401", "must be between 0.01 and 86400 (seconds)"),
    ("APIKEYS_FEED_POLL_SECONDS", "0", "must be between 0.01 and 60 (seconds)"),
    ("APIKEYS_MAX_STALENESS_SECONDS", "0.05", "must be between 0.1 and 3600 (seconds)"),
    ("APIKEYS_MAX_STALENESS_SECONDS", "nan", "must be between 0.1 and 3600 (seconds)"),
    ("APIKEYS_FEED_RETENTION", "59", "must be between 60 and 31536000 (seconds)"),
    ("APIKEYS_MAX_ROTATION_OVERLAP", "-1", "must be between 0 and 31536000 (seconds)"),
    ("APIKEYS_SHUTDOWN_GRACE_SECONDS", "3601", "must be between 0 and 3600 (seconds)"),
    ("APIKEYS_DB_CONNECT_TIMEOUT_SECONDS", "601", "must be between 0.01 and 600 (seconds)"),
    ("APIKEYS_LOG_LEVEL", "loud", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("APIKEYS_LISTEN", "localhost", "must be HOST:PORT with a port 0..65535"),
    ("APIKEYS_LISTEN", "127.0.0.1:65536", "must be HOST:PORT with a port 0..65535"),
    ("APIKEYS_KEY_PREFIX", "Live", "must be lowercase letters and digits"),
]


class TestRanges:
    @pytest.mark.parametrize(("name", "raw", "requirement"), OUT_OF_RANGE)
    def test_out_of_range_is_one_line_naming_variable_value_and_range(
        self, name: str, raw: str, requirement: str
    ) -> None:
        """`APIKEYS_X=value must be …`, with the flag too where there is one."""
        with pytest.raises(InvalidSetting) as caught:
            Settings.from_env({name: raw})
        message = str(caught.value)
        assert message.startswith(f"{name}={raw} "), message
        assert requirement in message
        assert "\n" not in message

    @pytest.mark.parametrize(
        ("name", "raw"),
        [
            ("APIKEYS_CACHE_TTL_SECONDS", "0"),
            ("APIKEYS_CACHE_TTL_SECONDS", "86400"),
            ("APIKEYS_CACHE_SIZE", "0"),
            ("APIKEYS_LAST_USED_FLUSH_SECONDS", "0.01"),
            ("APIKEYS_WORKERS", "1024"),
            ("APIKEYS_PROCESSES", "64"),
            ("APIKEYS_MAX_ROTATION_OVERLAP", "0"),
            ("APIKEYS_LISTEN", "[::]:50051"),
            ("APIKEYS_LISTEN", "unix:/run/apikeys.sock"),
        ],
    )
    def test_the_ends_of_each_range_are_allowed(self, name: str, raw: str) -> None:
        """Ranges are inclusive."""
        Settings.from_env({name: raw})

    def test_a_flag_value_is_named_as_the_flag(self) -> None:
        """What came from a flag is worded as the flag, with its variable alongside."""
        with pytest.raises(InvalidSetting) as caught:
            Settings.from_env({}, workers=0)
        assert str(caught.value) == "--workers 0 (or APIKEYS_WORKERS) must be between 1 and 1024"

    def test_rules_hold_for_settings_built_directly(self) -> None:
        """The check is in Settings itself, not only in from_env."""
        with pytest.raises(InvalidSetting, match="APIKEYS_CACHE_SIZE=-1 must be"):
            Settings(cache_size=-1)

    def test_every_setting_declares_what_it_may_be(self) -> None:
        """A range, allowed values or a shape next to each field, shown in --help."""
        for item in fields(Settings):
            assert rule_of(item).allowed(), item.name
            assert rule_of(item).help, item.name
            assert describe(item).startswith(f"${variable_of(item.name)}; default ")

    def test_defaults_are_within_their_ranges(self) -> None:
        """Settings() itself passes its own rules."""
        assert Settings().cache_ttl_seconds == 300


class TestTogether:
    @pytest.mark.parametrize(
        ("env", "fragment"),
        [
            (
                {"APIKEYS_FEED_POLL_SECONDS": "10"},
                "APIKEYS_FEED_POLL_SECONDS (10) must be smaller than "
                "APIKEYS_MAX_STALENESS_SECONDS (10)",
            ),
            (
                {"APIKEYS_MAX_STALENESS_SECONDS": "0.2"},
                "APIKEYS_FEED_POLL_SECONDS (0.25) must be smaller than",
            ),
            ({"APIKEYS_TLS_CERT_FILE": "/c.pem"}, "give both or neither"),
            ({"APIKEYS_TLS_KEY_FILE": "/k.pem"}, "give both or neither"),
            (
                {"APIKEYS_TLS_CLIENT_CA_FILE": "/ca.pem"},
                "--tls-client-ca-file / APIKEYS_TLS_CLIENT_CA_FILE needs --tls-cert-file",
            ),
        ],
    )
    def test_conflicts_are_refused(self, env: dict[str, str], fragment: str) -> None:
        """Settings each allowed alone but not together: one line naming both."""
        with pytest.raises(SettingsConflict) as caught:
            Settings.from_env(env)
        assert fragment in str(caught.value)

    def test_tls_settings_together(self) -> None:
        """Cert and key (and a client CA) together are TLS."""
        env = {
            "APIKEYS_TLS_CERT_FILE": "/c.pem",
            "APIKEYS_TLS_KEY_FILE": "/k.pem",
            "APIKEYS_TLS_CLIENT_CA_FILE": "/ca.pem",
        }
        settings = Settings.from_env(env)
        assert settings.tls and settings.tls_client_ca_file == Path("/ca.pem")
        assert not Settings().tls


class TestLoopback:
    @pytest.mark.parametrize(
        ("listen", "loopback"),
        [
            ("127.0.0.1:50051", True),
            ("127.3.4.5:1", True),
            ("localhost:50051", True),
            ("[::1]:50051", True),
            ("unix:/run/x.sock", True),
            ("0.0.0.0:50051", False),
            ("[::]:50051", False),
            ("10.0.0.5:50051", False),
            ("apikeys.internal:50051", False),
        ],
    )
    def test_which_addresses_are_local(self, listen: str, loopback: bool) -> None:
        """Plaintext is only quiet on addresses other hosts cannot reach."""
        assert is_loopback(listen) is loopback


class TestObservability:
    def test_metrics_listen_needs_host_and_port(self) -> None:
        with pytest.raises(ValueError, match="APIKEYS_METRICS_LISTEN"):
            Settings.from_env({"APIKEYS_METRICS_LISTEN": "9464"})

    def test_metrics_port_zero_needs_one_process(self) -> None:
        with pytest.raises(ValueError, match="fixed port"):
            Settings.from_env({"APIKEYS_METRICS_LISTEN": "127.0.0.1:0", "APIKEYS_PROCESSES": "2"})

    def test_log_format_is_text_or_json(self) -> None:
        assert Settings.from_env({"APIKEYS_LOG_FORMAT": "json"}).log_format == "json"
        with pytest.raises(ValueError, match="APIKEYS_LOG_FORMAT"):
            Settings.from_env({"APIKEYS_LOG_FORMAT": "xml"})


class TestConsoleSettings:
    def test_defaults(self) -> None:
        """The console listens on loopback and calls the service on its default address."""
        settings = ConsoleSettings.from_env({})
        assert (settings.listen, settings.target) == ("127.0.0.1:8080", "localhost:50051")
        assert settings.idle_minutes == 15 and not settings.grpc_tls and not settings.https

    def test_variables_then_flags(self) -> None:
        """APIKEYS_CONSOLE_* variables are read; flags (non-None overrides) beat them."""
        env = {
            "APIKEYS_CONSOLE_LISTEN": "0.0.0.0:9000",
            "APIKEYS_CONSOLE_TARGET": "keys:50051",
            "APIKEYS_CONSOLE_TLS_CA_FILE": "/etc/ca.pem",
            "APIKEYS_CONSOLE_IDLE_MINUTES": "5",
            "APIKEYS_LISTEN": "0.0.0.0:1",  # the server's own setting, not the console's
        }
        settings = ConsoleSettings.from_env(env, target="other:1", listen=None)
        assert settings.listen == "0.0.0.0:9000" and settings.target == "other:1"
        assert settings.tls_ca_file == Path("/etc/ca.pem") and settings.grpc_tls
        assert settings.idle_minutes == 5.0

    @pytest.mark.parametrize(
        "env",
        [
            {"APIKEYS_CONSOLE_LISTEN": "nowhere"},
            {"APIKEYS_CONSOLE_IDLE_MINUTES": "0"},
            {"APIKEYS_CONSOLE_IDLE_MINUTES": "soon"},
            {"APIKEYS_CONSOLE_TLS": "maybe"},
            {"APIKEYS_CONSOLE_TLS_CERT_FILE": "/c.pem"},
            {"APIKEYS_CONSOLE_HTTPS_KEY_FILE": "/k.pem"},
        ],
    )
    def test_bad_values_are_refused(self, env: dict[str, str]) -> None:
        """Bad shapes, ranges, spellings and half pairs are a ValueError (exit 2 in cli.py)."""
        with pytest.raises(ValueError):
            ConsoleSettings.from_env(env)
