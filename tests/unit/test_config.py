"""Settings: defaults, APIKEYS_* environment variables, then explicit overrides."""

from dataclasses import FrozenInstanceError, fields
from datetime import timedelta
from pathlib import Path

import pytest

from apikeys_server.config import Settings


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
        samples = {int: "7", float: "7.5", bool: "0", timedelta: "7", str: "x"}
        for item in fields(Settings):
            raw = samples.get(item.type, "/tmp/x")  # type: ignore[call-overload]
            settings = Settings.from_env({f"APIKEYS_{item.name.upper()}": raw})
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
        with pytest.raises(ValueError, match=r"--processes / APIKEYS_PROCESSES .* 1 and 64"):
            Settings.from_env({"APIKEYS_PROCESSES": raw})

    def test_port_zero_needs_one_process(self) -> None:
        """Each process would bind a port of its own: refused."""
        with pytest.raises(ValueError, match="each of the 2 processes"):
            Settings.from_env({}, listen="127.0.0.1:0", processes=2)
        assert Settings.from_env({}, listen="127.0.0.1:0").processes == 1
